//! Property tests over the decoders of untrusted input: they stand in for the cargo-fuzz
//! targets in `fuzz/` where nightly is missing, calling the same entry points.

use std::sync::OnceLock;

use isthmus_ca::pb::IstioCertificateRequest;
use isthmus_ca::{Ca, CaConfig, SpiffeId};
use proptest::prelude::*;
use prost::Message;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

fn ca() -> &'static (Ca, SpiffeId, Vec<u8>) {
    static CA: OnceLock<(Ca, SpiffeId, Vec<u8>)> = OnceLock::new();
    CA.get_or_init(|| {
        // The CA keeps its material in memory once loaded; the directory can go.
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&CaConfig::new(dir.path())).unwrap();
        let caller: SpiffeId = "spiffe://cluster.local/ns/fuzz/sa/default".parse().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(caller.to_string().try_into().unwrap())];
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        (ca, caller, der)
    })
}

/// What the fuzz target `certificate_request` does with one input.
fn handle(bytes: &[u8]) {
    let (ca, caller, _) = ca();
    if let Ok(request) = isthmus_ca::decode_request(bytes) {
        if let Ok(checked) = ca.check_request(&request, caller) {
            assert!(ca.sign(&checked).unwrap().len() >= 2);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        handle(&bytes);
    }

    #[test]
    fn requests_with_random_fields_never_panic(csr in ".{0,512}", validity in any::<i64>()) {
        let request = IstioCertificateRequest { csr, validity_duration: validity, metadata: None };
        handle(&request.encode_to_vec());
    }

    #[test]
    fn mutated_csrs_never_panic(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let (_, caller, der) = ca();
        let mut der = der.clone();
        let i = pos.index(der.len());
        der[i] = byte;
        // A changed byte either breaks the request or leaves it meaning the same.
        if let Ok(parsed) = isthmus_ca::parse_csr_der(&der) {
            prop_assert_eq!(&parsed.identity, caller);
        }
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let request = IstioCertificateRequest { csr: pem, validity_duration: 3600, metadata: None };
        handle(&request.encode_to_vec());
    }
}
