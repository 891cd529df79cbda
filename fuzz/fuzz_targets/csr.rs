//! CSR decoding and validation: DER directly, and the same bytes as PEM text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = isthmus_ca::parse_csr_der(data) {
        // Whatever parses must name a well-formed identity.
        let _ = parsed
            .identity
            .to_string()
            .parse::<isthmus_ca::SpiffeId>()
            .unwrap();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = isthmus_ca::parse_csr(text);
    }
});
