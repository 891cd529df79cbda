//! Parsing and checking the certificate signing requests that workloads send. Everything
//! here handles untrusted input: it is fuzzed (see `fuzz/`) and never panics.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::spiffe::{SpiffeError, SpiffeId};

/// Largest PEM CSR accepted. A P-256 CSR is under 1 KiB; RSA-4096 about 3 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is {size} bytes; the limit is {MAX_CSR_BYTES} bytes")]
    TooLarge { size: usize },
    #[error("CSR is not PEM ({detail}): send one -----BEGIN CERTIFICATE REQUEST----- block")]
    NotPem { detail: String },
    #[error("CSR PEM holds {found}; send exactly one CERTIFICATE REQUEST block")]
    BlockCount { found: String },
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Der(String),
    #[error(
        "CSR signature does not verify: the request was altered or not signed with its own key"
    )]
    BadSignature,
    #[error("CSR key is {0}; use an ECDSA P-256 key (P-384 and RSA of 2048 bits or more are also accepted)")]
    UnsupportedKey(String),
    #[error("CSR has no URI SAN: it must carry exactly one, the caller's SPIFFE ID")]
    NoIdentity,
    #[error("CSR asks for {count} identities ({list}); it must carry exactly one URI SAN, the caller's SPIFFE ID")]
    SeveralIdentities { count: usize, list: String },
    #[error("CSR asks for the {kind} SAN {value:?}; workload certificates carry only the SPIFFE ID URI SAN")]
    ForeignSan { kind: &'static str, value: String },
    #[error("CSR URI SAN {uri:?} is not a workload SPIFFE ID: {source}")]
    NotSpiffe {
        uri: String,
        #[source]
        source: SpiffeError,
    },
}

impl CsrError {
    /// True when the CSR is well-formed but asks for more than one identity: a permission
    /// problem rather than a malformed request.
    pub fn asks_for_extra_identity(&self) -> bool {
        matches!(
            self,
            Self::SeveralIdentities { .. } | Self::ForeignSan { .. }
        )
    }
}

/// A CSR whose signature verified and which asks for exactly one workload identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCsr {
    /// The SPIFFE ID the CSR asks for (not yet compared with the caller's).
    pub identity: SpiffeId,
    /// DER SubjectPublicKeyInfo of the key that will be certified.
    pub public_key_der: Vec<u8>,
}

/// Decodes a PEM CSR, verifies its self-signature and key type, and extracts the one
/// SPIFFE ID it asks for.
pub fn parse_csr(pem_text: &str) -> Result<ParsedCsr, CsrError> {
    if pem_text.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge {
            size: pem_text.len(),
        });
    }
    let blocks = pem::parse_many(pem_text).map_err(|e| CsrError::NotPem {
        detail: e.to_string(),
    })?;
    let der = match blocks.as_slice() {
        [] => {
            return Err(CsrError::NotPem {
                detail: "no PEM block found".into(),
            })
        }
        [one] if matches!(one.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST") => {
            one.contents()
        }
        other => {
            let tags: Vec<&str> = other.iter().map(|b| b.tag()).collect();
            return Err(CsrError::BlockCount {
                found: format!("{} block(s): {}", tags.len(), tags.join(", ")),
            });
        }
    };
    parse_csr_der(der)
}

/// Same as [`parse_csr`] for DER input.
pub fn parse_csr_der(der: &[u8]) -> Result<ParsedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let spki = &csr.certification_request_info.subject_pki;
    check_key(spki.parsed())?;

    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => return Err(foreign("DNS", d)),
                GeneralName::RFC822Name(m) => return Err(foreign("email", m)),
                GeneralName::IPAddress(ip) => return Err(foreign("IP", &format!("{ip:02x?}"))),
                other => return Err(foreign("other", &format!("{other:?}"))),
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(CsrError::NoIdentity),
        [one] => one,
        many => {
            return Err(CsrError::SeveralIdentities {
                count: many.len(),
                list: many.join(", "),
            })
        }
    };
    let identity = uri.parse().map_err(|source| CsrError::NotSpiffe {
        uri: uri.clone(),
        source,
    })?;
    Ok(ParsedCsr {
        identity,
        public_key_der: spki.raw.to_vec(),
    })
}

fn foreign(kind: &'static str, value: &str) -> CsrError {
    CsrError::ForeignSan {
        kind,
        value: value.to_owned(),
    }
}

fn check_key(key: Result<PublicKey<'_>, x509_parser::error::X509Error>) -> Result<(), CsrError> {
    match key {
        Ok(PublicKey::EC(p)) if matches!(p.key_size(), 256 | 384) => Ok(()),
        Ok(PublicKey::EC(p)) => Err(CsrError::UnsupportedKey(format!(
            "an EC key of {} bits",
            p.key_size()
        ))),
        Ok(PublicKey::RSA(r)) if r.key_size() >= 2048 => Ok(()),
        Ok(PublicKey::RSA(r)) => Err(CsrError::UnsupportedKey(format!(
            "RSA of {} bits",
            r.key_size()
        ))),
        Ok(_) => Err(CsrError::UnsupportedKey("of an unsupported type".into())),
        Err(e) => Err(CsrError::UnsupportedKey(format!("unreadable ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    fn csr_with(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_one_spiffe_uri() {
        let csr = csr_with(vec![uri("spiffe://cluster.local/ns/db/sa/mysql")]);
        let parsed = parse_csr(&csr).unwrap();
        assert_eq!(
            parsed.identity.to_string(),
            "spiffe://cluster.local/ns/db/sa/mysql"
        );
    }

    #[test]
    fn refuses_each_bad_shape() {
        let cases = [
            (vec![], "no URI SAN"),
            (
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    uri("spiffe://cluster.local/ns/c/sa/d"),
                ],
                "asks for 2 identities",
            ),
            (
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    SanType::DnsName("evil.example".try_into().unwrap()),
                ],
                "DNS SAN \"evil.example\"",
            ),
            (
                vec![uri("https://example.com/x")],
                "not a workload SPIFFE ID",
            ),
        ];
        for (sans, want) in cases {
            let err = parse_csr(&csr_with(sans)).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn refuses_tampered_signature() {
        let csr = csr_with(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
        let block = pem::parse(&csr).unwrap();
        let mut der = block.contents().to_vec();
        let last = der.len() - 3;
        der[last] ^= 0x55;
        assert!(matches!(
            parse_csr_der(&der),
            Err(CsrError::BadSignature | CsrError::Der(_))
        ));
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        assert!(matches!(parse_csr("hello"), Err(CsrError::NotPem { .. })));
        let big = "A".repeat(MAX_CSR_BYTES + 1);
        assert!(matches!(parse_csr(&big), Err(CsrError::TooLarge { .. })));
        let cert_pem = rcgen::generate_simple_self_signed(vec!["x".into()])
            .unwrap()
            .cert
            .pem();
        assert!(matches!(
            parse_csr(&cert_pem),
            Err(CsrError::BlockCount { .. })
        ));
    }

    proptest! {
        // Stands in for `cargo fuzz` where nightly is missing: no input may panic.
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_csr_der(&bytes);
            let _ = parse_csr(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn never_panics_on_pem_wrapped_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
            let _ = parse_csr(&text);
        }
    }
}
