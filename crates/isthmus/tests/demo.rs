//! `isthmus demo` end to end (root only; CI runs as root): it builds the mesh in network
//! namespaces, makes the calls both ways, and leaves nothing behind.

mod common;
use std::process::Command;

use common::BIN;

fn demo_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("isthmus-demo-"))
        .map(str::to_string)
        .collect()
}

#[test]
fn demo_in_network_namespaces_calls_both_ways_and_cleans_up() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("!!!! SKIP demo_in_network_namespaces_calls_both_ways_and_cleans_up: needs root (network namespaces, iptables) !!!!");
        return;
    }
    let out = Command::new(BIN)
        .args(["demo", "--subnet", "10.214.0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The VM reached productpage by name, and productpage reached reviews, each on its host.
    assert!(
        stdout.contains("productpage on 10.214.0.2 <- reviews on 10.214.0.3"),
        "{stdout}"
    );
    // The mesh reached the VM's registered service.
    assert!(stdout.contains("mysql on 10.214.0.4"), "{stdout}");
    assert!(stdout.contains("onprem"), "workloads table: {stdout}");
    // HTTP-aware: the 90/10 split chose per request (both versions answered), the L7 policy
    // refused /admin with Istio's 403, and the source agent's request metrics show both.
    let split = stdout
        .lines()
        .find(|l| l.contains("answered by reviews v1"))
        .unwrap_or_else(|| panic!("no split line: {stdout}"));
    let nums: Vec<u32> = split
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        nums.len() >= 2 && nums[0] + nums[1] == 100 && nums[1] >= 1 && nums[1] <= 30,
        "{split}"
    );
    assert!(
        stdout.contains("403"),
        "the L7 policy did not refuse /admin: {stdout}"
    );
    assert!(
        stdout.contains("reporter=source destination_version=v2 response_code=200"),
        "{stdout}"
    );
    // The denied request went to v1 or v2 (90/10): either way both reporters counted it.
    for reporter in ["source", "destination"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("reporter={reporter} "))
                    && l.contains("response_code=403")),
            "the denied request is not in the {reporter} metrics: {stdout}"
        );
    }
    assert!(stdout.contains("removed the namespaces"), "{stdout}");
    assert_eq!(demo_namespaces(), Vec::<String>::new(), "namespaces left");
    assert!(
        !std::path::Path::new("/etc/netns/isthmus-demo-vm").exists(),
        "resolver file left"
    );
}

#[test]
fn demo_without_root_says_why() {
    if nix::unistd::Uid::effective().is_root() {
        // Run it as nobody: the refusal must name the reason and the fix.
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "demo",
            ])
            .output();
        let Ok(out) = out else {
            eprintln!("!!!! SKIP demo_without_root_says_why: no setpriv !!!!");
            return;
        };
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("needs root") && err.contains("sudo isthmus demo"),
            "{err}"
        );
        return;
    }
    let out = Command::new(BIN).arg("demo").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs root") && err.contains("sudo isthmus demo"),
        "{err}"
    );
}
