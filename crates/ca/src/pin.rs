//! Root pins: `sha256:<hex>` of a root certificate's DER, as kubeadm pins its cluster CA. A
//! join token carries the pins of the mesh roots, so a host that has only the token and the
//! control plane's address can tell the real control plane from an impostor.
//! The same value from a root file: `openssl x509 -in root-cert.pem -outform der | sha256sum`.

use rustls::pki_types::CertificateDer;

/// The only hash there is, named in every pin so that another can be added later.
pub const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// Why a pin was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("root hash {0:?} does not start with `sha256:` (expected sha256:<64 hex digits>, as `isthmus token create` prints)")]
    Prefix(String),
    #[error("root hash {value:?} has {len} hex digits after `sha256:`, expected 64")]
    Length { value: String, len: usize },
    #[error("root hash {0:?} has characters that are not hex digits after `sha256:`")]
    NotHex(String),
}

/// The pin of one certificate: `sha256:` and 64 lowercase hex digits.
pub fn root_hash(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("{PREFIX}{}", hex::encode(digest.as_ref()))
}

/// Pins of every certificate of a trust bundle, in order.
pub fn root_hashes(roots: &[CertificateDer<'_>]) -> Vec<String> {
    roots.iter().map(|r| root_hash(r)).collect()
}

/// Checks a pin as typed by a person (either case, spaces around) and returns it in the form
/// [`root_hash`] makes.
pub fn parse_root_hash(s: &str) -> Result<String, PinError> {
    let t = s.trim();
    let hex = t
        .get(..PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PREFIX))
        .map(|_| &t[PREFIX.len()..])
        .ok_or_else(|| PinError::Prefix(s.to_string()))?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PinError::NotHex(s.to_string()));
    }
    if hex.len() != HEX_LEN {
        return Err(PinError::Length {
            value: s.to_string(),
            len: hex.len(),
        });
    }
    Ok(format!("{PREFIX}{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_of_the_der() {
        // sha256("abc"), a standard test vector.
        assert_eq!(
            root_hash(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parsing_normalises_and_names_the_problem() {
        let h = root_hash(b"abc");
        assert_eq!(parse_root_hash(&h).unwrap(), h);
        assert_eq!(parse_root_hash(&h.to_uppercase()).unwrap(), h);
        assert_eq!(parse_root_hash(&format!("  {h}\n")).unwrap(), h);
        let bare = h.trim_start_matches(PREFIX);
        assert_eq!(
            parse_root_hash(bare),
            Err(PinError::Prefix(bare.to_string()))
        );
        assert_eq!(
            parse_root_hash("sha1:abcd"),
            Err(PinError::Prefix("sha1:abcd".into()))
        );
        assert!(matches!(
            parse_root_hash(&h[..h.len() - 2]),
            Err(PinError::Length { len: 62, .. })
        ));
        assert!(matches!(
            parse_root_hash(&format!("{h}00")),
            Err(PinError::Length { len: 66, .. })
        ));
        let bad = format!("{}zz", &h[..h.len() - 2]);
        assert_eq!(parse_root_hash(&bad), Err(PinError::NotHex(bad.clone())));
        assert!(parse_root_hash("sha256:").is_err());
        assert!(parse_root_hash("").is_err());
        let msg = parse_root_hash("sha256:12").unwrap_err().to_string();
        assert!(
            msg.contains("has 2 hex digits") && msg.contains("expected 64"),
            "{msg}"
        );
    }
}
