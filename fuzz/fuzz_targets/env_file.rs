//! Seed env files (`cluster.env`, `sidecar.env`): arbitrary bytes as an env file, then as the
//! interception config and its iptables rules. Nothing may panic, and whatever a file holds,
//! the rules stay iptables-restore commands in Isthmus's own chains (no injected lines).
#![no_main]

use isthmus_intercept::{dry_run, EnvFile, InterceptConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = EnvFile::parse_bytes("sidecar.env", data) else {
        return;
    };
    let empty = EnvFile::empty("cluster.env");
    let Ok(config) = InterceptConfig::from_env(&empty, &file, &[]) else {
        return;
    };
    for line in dry_run(&config).lines() {
        assert!(
            line.starts_with('#')
                || line == "*nat"
                || line == "COMMIT"
                || line.starts_with(":ISTHMUS_")
                || line.starts_with("-A ISTHMUS_")
                || line.starts_with("-I OUTPUT 1 ")
                || line.starts_with("-I PREROUTING 1 "),
            "unexpected rule line {line:?}"
        );
    }
});
