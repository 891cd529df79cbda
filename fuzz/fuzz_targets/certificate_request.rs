//! `IstioCertificateRequest` bytes as the server receives them, then the CA's checks and,
//! when they pass, signing.
#![no_main]

use std::sync::OnceLock;

use isthmus_ca::{Ca, CaConfig, SpiffeId};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static (Ca, SpiffeId) {
    static CA: OnceLock<(Ca, SpiffeId)> = OnceLock::new();
    CA.get_or_init(|| {
        // The CA keeps its material in memory once loaded; the directory can go.
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::load_or_create(&CaConfig::new(dir.path())).expect("CA");
        let caller = "spiffe://cluster.local/ns/fuzz/sa/default"
            .parse()
            .expect("id");
        (ca, caller)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = isthmus_ca::decode_request(data) else {
        return;
    };
    let (ca, caller) = ca();
    if let Ok(checked) = ca.check_request(&request, caller) {
        let chain = ca.sign(&checked).expect("a checked request signs");
        assert!(chain.len() >= 2);
    }
});
