//! Parsing and checking the certificate signing requests that workloads send. Everything
//! here handles untrusted input: it is fuzzed (see `fuzz/`) and never panics.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::RSAPublicKey;
use x509_parser::signature_algorithm::RsaSsaPssParams;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use crate::spiffe::{SpiffeError, SpiffeId};

/// Largest PEM CSR accepted. A P-256 CSR is under 1 KiB; RSA-4096 about 3 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// The keys the CA certifies: those whose CSR self-signature ring verifies (through
/// x509-parser's `verify`) and that rustls with ring can use in a workload's handshakes. ring
/// has no P-521 or secp256k1, and takes RSA moduli of 2048 to 8192 bits only.
pub const ACCEPTED_KEYS: &str = "ECDSA P-256/P-384, Ed25519 and RSA of 2048 to 8192 bits";

/// The CSR signature algorithms the CA verifies; SHA-1 and MD5 are refused even where ring
/// could still verify them.
pub const ACCEPTED_SIGNATURES: &str =
    "ECDSA with SHA-256/SHA-384, Ed25519, and RSA (PKCS#1 v1.5 or PSS) with SHA-256/384/512";

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
    #[error("the CSR's key is {0}; the CA accepts {ACCEPTED_KEYS}")]
    UnsupportedKey(String),
    #[error("the CSR is signed with {0}, which is broken and refused; the CA accepts {ACCEPTED_SIGNATURES}")]
    WeakSignature(&'static str),
    #[error("the CSR is signed with {0}; the CA accepts {ACCEPTED_SIGNATURES}")]
    UnsupportedSignature(String),
    #[error("the CSR's key is {key} but it is signed with {signature}: sign it with its own key")]
    KeyMismatch {
        key: &'static str,
        signature: &'static str,
    },
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
    // Key and algorithm first: ring reports a key or algorithm it lacks as a bad signature,
    // which would tell the user the request was altered.
    let spki = &csr.certification_request_info.subject_pki;
    let key = key_family(spki)?;
    let signature = signature_family(&csr.signature_algorithm)?;
    if key.signer() != signature.0 {
        return Err(CsrError::KeyMismatch {
            key: key.name(),
            signature: signature.1,
        });
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

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

/// The accepted key types, as far as choosing a signature scheme goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    P256,
    P384,
    Ed25519,
    Rsa,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signer {
    Ecdsa,
    Ed25519,
    Rsa,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Self::P256 => "ECDSA P-256",
            Self::P384 => "ECDSA P-384",
            Self::Ed25519 => "Ed25519",
            Self::Rsa => "RSA",
        }
    }

    fn signer(self) -> Signer {
        match self {
            Self::P256 | Self::P384 => Signer::Ecdsa,
            Self::Ed25519 => Signer::Ed25519,
            Self::Rsa => Signer::Rsa,
        }
    }
}

const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

fn key_family(spki: &SubjectPublicKeyInfo<'_>) -> Result<Key, CsrError> {
    let unsupported = |what: String| Err(CsrError::UnsupportedKey(what));
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.113549.1.1.1" => {
            let bits = RSAPublicKey::from_der(&spki.subject_public_key.data)
                .map(|(_, k)| modulus_bits(k.modulus))
                .map_err(|_| CsrError::UnsupportedKey("an unreadable RSA key".into()))?;
            if RSA_BITS.contains(&bits) {
                Ok(Key::Rsa)
            } else {
                unsupported(format!("RSA {bits} bits"))
            }
        }
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => Ok(Key::P256),
                Some("1.3.132.0.34") => Ok(Key::P384),
                Some("1.3.132.0.35") => unsupported("ECDSA P-521".into()),
                Some("1.3.132.0.10") => unsupported("ECDSA secp256k1".into()),
                Some(other) => unsupported(format!("EC on the curve {other}")),
                None => unsupported("EC without a named curve".into()),
            }
        }
        "1.3.101.112" => Ok(Key::Ed25519),
        "1.3.101.113" => unsupported("Ed448".into()),
        "1.2.840.10040.4.1" => unsupported("DSA".into()),
        "1.2.840.113549.1.1.10" => unsupported("RSA restricted to PSS (id-RSASSA-PSS)".into()),
        other => unsupported(format!("of the type {other}")),
    }
}

/// Bits in a big-endian modulus, leading zero bytes and bits not counted (x509-parser's
/// `key_size` assumes exactly one leading zero byte).
fn modulus_bits(modulus: &[u8]) -> usize {
    let start = modulus
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(modulus.len());
    match modulus.get(start) {
        Some(first) => (modulus.len() - start) * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// The family of an accepted signature algorithm and its name, or why it is refused.
fn signature_family(alg: &AlgorithmIdentifier<'_>) -> Result<(Signer, &'static str), CsrError> {
    let oid = alg.algorithm.to_id_string();
    Ok(match oid.as_str() {
        "1.2.840.113549.1.1.11" => (Signer::Rsa, "RSA with SHA-256"),
        "1.2.840.113549.1.1.12" => (Signer::Rsa, "RSA with SHA-384"),
        "1.2.840.113549.1.1.13" => (Signer::Rsa, "RSA with SHA-512"),
        "1.2.840.113549.1.1.10" => {
            let Some(params) = alg
                .parameters
                .as_ref()
                .and_then(|p| RsaSsaPssParams::try_from(p).ok())
            else {
                return Err(CsrError::UnsupportedSignature(
                    "RSA-PSS with unreadable parameters".into(),
                ));
            };
            let hash = params.hash_algorithm_oid().to_id_string();
            let (name, hash_len) = match hash.as_str() {
                "2.16.840.1.101.3.4.2.1" => ("RSA-PSS with SHA-256", 32),
                "2.16.840.1.101.3.4.2.2" => ("RSA-PSS with SHA-384", 48),
                "2.16.840.1.101.3.4.2.3" => ("RSA-PSS with SHA-512", 64),
                "1.3.14.3.2.26" => return Err(CsrError::WeakSignature("RSA-PSS with SHA-1")),
                other => {
                    return Err(CsrError::UnsupportedSignature(format!(
                        "RSA-PSS with the hash {other}"
                    )))
                }
            };
            // ring verifies PSS only with MGF1 over the same hash and a salt as long as it.
            let mgf_hash = params.mask_gen_algorithm().map(|m| m.hash.to_id_string());
            if mgf_hash.as_deref() != Ok(hash.as_str()) {
                return Err(CsrError::UnsupportedSignature(format!(
                    "{name} but a different mask hash (use MGF1 with the same hash)"
                )));
            }
            if params.salt_length() != hash_len {
                return Err(CsrError::UnsupportedSignature(format!(
                    "{name} and a salt of {} bytes (the salt must be as long as the hash, \
                     {hash_len} bytes: openssl's -sigopt rsa_pss_saltlen:digest)",
                    params.salt_length()
                )));
            }
            (Signer::Rsa, name)
        }
        "1.2.840.10045.4.3.2" => (Signer::Ecdsa, "ECDSA with SHA-256"),
        "1.2.840.10045.4.3.3" => (Signer::Ecdsa, "ECDSA with SHA-384"),
        "1.3.101.112" => (Signer::Ed25519, "Ed25519"),
        "1.2.840.113549.1.1.5" | "1.3.14.3.2.29" => {
            return Err(CsrError::WeakSignature("RSA with SHA-1"))
        }
        "1.2.840.10045.4.1" => return Err(CsrError::WeakSignature("ECDSA with SHA-1")),
        "1.2.840.10040.4.3" => return Err(CsrError::WeakSignature("DSA with SHA-1")),
        "1.2.840.113549.1.1.4" | "1.3.14.3.2.25" => {
            return Err(CsrError::WeakSignature("RSA with MD5"))
        }
        "1.2.840.113549.1.1.2" => return Err(CsrError::WeakSignature("RSA with MD2")),
        "1.2.840.113549.1.1.3" => return Err(CsrError::WeakSignature("RSA with MD4")),
        "1.2.840.113549.1.1.14" => {
            return Err(CsrError::UnsupportedSignature("RSA with SHA-224".into()))
        }
        "1.2.840.10045.4.3.1" => {
            return Err(CsrError::UnsupportedSignature("ECDSA with SHA-224".into()))
        }
        "1.2.840.10045.4.3.4" => {
            return Err(CsrError::UnsupportedSignature("ECDSA with SHA-512".into()))
        }
        "1.3.101.113" => return Err(CsrError::UnsupportedSignature("Ed448".into())),
        other => {
            return Err(CsrError::UnsupportedSignature(format!(
                "the algorithm {other}"
            )))
        }
    })
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
