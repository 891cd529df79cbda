//! The admin API's and `isthmus apply`'s input: YAML/JSON resource documents. Whatever parses
//! must validate and survive a JSON round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(resources) = isthmus_model::parse_documents(text) {
            for r in resources {
                isthmus_model::validate(&r).unwrap();
                let again = isthmus_model::parse_json(&r.to_json()).unwrap();
                assert_eq!(again, r);
            }
        }
        let _ = isthmus_model::LabelSelector::parse(text);
    }
    let _ = isthmus_model::parse_json(data);
});
