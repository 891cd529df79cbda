//! What an agent accepts from the control plane: a discovery cache file (read at start) and
//! any resource body the client decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = isthmus_xds::client::decode_cache(std::path::Path::new("fuzz"), data);
});
