//! The CSRs every run signs, made before any timing starts: key generation is the client's
//! cost, not the CA's, and would otherwise share the two cores with the server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_ca::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

/// `n` PEM CSRs, each for a fresh ECDSA P-256 key with `identity` as its one URI SAN, the
/// way the agent builds them (crates/agent/src/identity/client.rs, `make_csr`); and how long
/// making them took.
pub fn generate(identity: &SpiffeId, n: usize) -> anyhow::Result<(Arc<[String]>, Duration)> {
    let start = Instant::now();
    let uri: rcgen::string::Ia5String = identity
        .to_string()
        .try_into()
        .context("the SPIFFE ID is not an IA5 string")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csrs = (0..n)
        .map(|_| {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            params.serialize_request(&key)?.pem()
        })
        .collect::<Result<Vec<String>, rcgen::Error>>()
        .context("cannot make a key and CSR")?;
    Ok((csrs.into(), start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrs_carry_the_identity_and_distinct_keys() {
        let id = SpiffeId::new("cluster.local", "bench", "sa").unwrap();
        let (csrs, _) = generate(&id, 3).unwrap();
        let parsed: Vec<_> = csrs
            .iter()
            .map(|c| isthmus_ca::parse_csr(c).unwrap())
            .collect();
        assert!(parsed.iter().all(|p| p.identity == id));
        assert_ne!(parsed[0].public_key_der, parsed[1].public_key_der);
    }
}
