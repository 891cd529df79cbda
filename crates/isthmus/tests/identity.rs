//! Mesh identity end to end through the binary: an operator creates a token, a host's agent
//! gets and rotates its certificate with it, and a revoked or bad token gets nothing.

mod common;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use isthmus_ca::cert::{parse_pem_certs, CertInfo};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

struct Agent(Option<Child>);

impl Agent {
    /// Waits for the agent to exit by itself (it does on a credential it cannot fix).
    fn output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent(
    s: &Server,
    cert_dir: &std::path::Path,
    token_file: &std::path::Path,
    extra: &[&str],
) -> Agent {
    Agent(Some(
        Command::new(BIN)
            .args([
                "agent",
                "--identity-only",
                "--ca-addr",
                &s.grpc,
                "--metrics-addr",
                "127.0.0.1:0",
                "--join-token-file",
            ])
            .arg(token_file)
            .arg("--cert-dir")
            .arg(cert_dir)
            .args(extra)
            .env("ISTHMUS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

/// The leaf certificate on disk, if key and chain are both there and belong together.
fn leaf(dir: &std::path::Path) -> Option<CertInfo> {
    let chain = std::fs::read_to_string(dir.join("cert-chain.pem")).ok()?;
    std::fs::metadata(dir.join("key.pem")).ok()?;
    let certs = parse_pem_certs(&chain, "chain").ok()?;
    CertInfo::parse(certs.first()?, "leaf").ok()
}

#[test]
fn token_then_rotation_then_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    // The CA's key is owner-only in an owner-only directory.
    assert_eq!(mode(&dir.path().join("ca/ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.path().join("ca")), 0o700);

    let out = s.cli(&[
        "token", "create", "-n", "onprem", "-s", "mysql", "--ttl", "1h", "--uses", "2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("for spiffe://cluster.local/ns/onprem/sa/mysql")
            && note.contains("for 2 certificate(s)"),
        "{note}"
    );
    assert_eq!(token.matches('.').count(), 2, "a JWT: {token}");

    let host = tempfile::tempdir().unwrap();
    let certs = host.path().join("certs");
    let out = s.ok(&[
        "vm",
        "certs",
        "-n",
        "onprem",
        "-s",
        "mysql",
        "-o",
        certs.to_str().unwrap(),
    ]);
    assert!(
        out.contains("root-cert.pem") && !certs.join("key.pem").exists(),
        "{out}"
    );
    let token_file = host.path().join("token");
    std::fs::write(&token_file, &token).unwrap();

    // Certificates of a few seconds, so the agent renews twice within the test.
    let _agent = agent(&s, &certs, &token_file, &["--cert-lifetime", "4s"]);
    let first = wait_for("the first certificate", Duration::from_secs(20), || {
        leaf(&certs)
    });
    assert_eq!(
        first.spiffe_id().unwrap().to_string(),
        "spiffe://cluster.local/ns/onprem/sa/mysql"
    );
    assert_eq!(mode(&certs.join("key.pem")), 0o600);
    let mut serials = vec![first.serial.clone()];
    // Every read of the files until two renewals: a valid certificate is always there.
    wait_for("two renewals", Duration::from_secs(30), || {
        let now = leaf(&certs).expect("certificate files are always present");
        assert!(
            now.is_valid_at(SystemTime::now()),
            "an expired certificate was left on disk"
        );
        if !serials.contains(&now.serial) {
            serials.push(now.serial.clone());
        }
        (serials.len() >= 3).then_some(())
    });
    // Renewals used the certificate, not the token: one use of two.
    let list = s.ok(&["token", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains("spiffe://cluster.local/ns/onprem/sa/mysql")
                && l.contains(" 1/2 ")
                && l.ends_with("active")),
        "{list}"
    );

    let id = list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        s.ok(&["token", "revoke", &id]),
        format!("token {id} revoked\n")
    );
    assert!(s
        .ok(&["token", "list"])
        .lines()
        .nth(1)
        .unwrap()
        .ends_with("revoked"));
    assert!(s
        .fails(&["token", "revoke", "no-such-id"])
        .contains("token no-such-id not found"));

    // A fresh host with the revoked token gets nothing, and the agent says why.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(
        certs.join("root-cert.pem"),
        other.path().join("root-cert.pem"),
    )
    .unwrap();
    let out = agent(&s, other.path(), &token_file, &[]).output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked"), "{err}");
    assert!(
        !other.path().join("key.pem").exists() && !other.path().join("cert-chain.pem").exists()
    );
}

#[test]
fn a_forged_token_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let host = tempfile::tempdir().unwrap();
    s.ok(&["vm", "certs", "-o", host.path().to_str().unwrap()]);
    let token_file = host.path().join("token");
    let real = String::from_utf8(s.cli(&["token", "create", "-n", "a", "-s", "b"]).stdout).unwrap();
    // Same header and claims, someone else's signature.
    let mut parts: Vec<&str> = real.trim().split('.').collect();
    parts[2] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    std::fs::write(&token_file, parts.join(".")).unwrap();
    let out = agent(&s, host.path(), &token_file, &[]).output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("signature"), "{err}");
    assert!(!host.path().join("key.pem").exists());
}

#[test]
fn bootstrap_certs_and_token_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out_dir = tempfile::tempdir().unwrap();
    let out = s.ok(&[
        "vm",
        "certs",
        "-n",
        "onprem",
        "-s",
        "db",
        "-o",
        out_dir.path().to_str().unwrap(),
        "--all",
        "--lifetime",
        "2h",
    ]);
    assert!(
        out.contains("bootstrap certificate for spiffe://cluster.local/ns/onprem/sa/db"),
        "{out}"
    );
    assert_eq!(mode(&out_dir.path().join("key.pem")), 0o600);
    let leaf = leaf(out_dir.path()).unwrap();
    assert_eq!(
        leaf.spiffe_id().unwrap().to_string(),
        "spiffe://cluster.local/ns/onprem/sa/db"
    );
    let chain = parse_pem_certs(
        &std::fs::read_to_string(out_dir.path().join("cert-chain.pem")).unwrap(),
        "chain",
    )
    .unwrap();
    let roots = parse_pem_certs(
        &std::fs::read_to_string(out_dir.path().join("root-cert.pem")).unwrap(),
        "roots",
    )
    .unwrap();
    let verified = isthmus_ca::ChainVerifier::new(&roots, vec![])
        .unwrap()
        .verify(&chain, SystemTime::now())
        .unwrap();
    assert_eq!(
        verified.to_string(),
        "spiffe://cluster.local/ns/onprem/sa/db",
        "the chain verifies against root-cert.pem"
    );

    let err = s.fails(&[
        "vm",
        "certs",
        "-o",
        out_dir.path().to_str().unwrap(),
        "--all",
        "--lifetime",
        "1000d",
    ]);
    assert!(err.contains("above this CA's maximum"), "{err}");
    let err = s.fails(&["token", "create", "--ttl", "soon"]);
    assert!(err.contains("ttl \"soon\" is not a duration"), "{err}");
    let err = s.fails(&["token", "create", "--ttl", "365d"]);
    assert!(err.contains("is out of range"), "{err}");
    let err = s.fails(&["token", "create", "-n", "Bad_NS"]);
    assert!(err.contains("namespace \"Bad_NS\""), "{err}");
    let err = s.fails(&["token", "create", "--uses", "0"]);
    assert!(err.contains("uses must be at least 1"), "{err}");
    assert_eq!(
        s.ok(&["token", "list"]),
        "No tokens.\n",
        "refused requests stored nothing"
    );
}

/// The three-phase root rotation of crates/ca/ROTATION.md, with a live host: its agent keeps a
/// valid certificate through every phase and ends up trusting only the new root.
#[test]
fn root_rotation_without_breaking_hosts() {
    // The agent needs a stable address across control-plane restarts.
    let port = stable_port();
    let grpc = format!("127.0.0.1:{port}");
    let new_ca = tempfile::tempdir().unwrap();
    {
        // A throwaway control plane makes the new root's material.
        let _throwaway = Server::start(new_ca.path());
    }
    let new_ca_dir = new_ca.path().join("ca");
    let dir = tempfile::tempdir().unwrap();
    let old_ca_dir = dir.path().join("ca");
    let start = |extra: &[&str]| {
        let mut args = vec!["--grpc-addr", grpc.as_str()];
        args.extend_from_slice(extra);
        Server::start_with_grpc(dir.path(), &args)
    };
    let roots_on_host = |certs: &std::path::Path| {
        parse_pem_certs(
            &std::fs::read_to_string(certs.join("root-cert.pem")).unwrap(),
            "roots",
        )
        .unwrap()
    };
    let root_of = |ca_dir: &std::path::Path| {
        parse_pem_certs(
            &std::fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap(),
            "root",
        )
        .unwrap()[0]
            .clone()
    };

    let mut s = start(&[]);
    let host = tempfile::tempdir().unwrap();
    let certs = host.path().join("certs");
    s.ok(&["vm", "certs", "-o", certs.to_str().unwrap()]);
    let token_file = host.path().join("token");
    std::fs::write(
        &token_file,
        String::from_utf8(s.cli(&["token", "create", "--uses", "1"]).stdout).unwrap(),
    )
    .unwrap();
    let _agent = agent(&s, &certs, &token_file, &["--cert-lifetime", "4s"]);
    let serial_now = || leaf(&certs).map(|c| c.serial);
    let renewed_after = |what: &str, before: Option<String>| {
        wait_for(what, Duration::from_secs(30), || {
            let now = leaf(&certs).expect("certificate files are always present");
            assert!(
                now.is_valid_at(SystemTime::now()),
                "{what}: the host was left without a valid certificate"
            );
            (Some(&now.serial) != before.as_ref()).then_some(())
        })
    };
    wait_for("the first certificate", Duration::from_secs(20), || {
        leaf(&certs)
    });
    let (old_root, new_root) = (root_of(&old_ca_dir), root_of(&new_ca_dir));

    // Phase 1: old CA signs, new root distributed.
    let bundle_new = host.path().join("new-root.pem");
    std::fs::copy(new_ca_dir.join("root-cert.pem"), &bundle_new).unwrap();
    assert!(s.term().success());
    s = start(&["--trust-bundle", bundle_new.to_str().unwrap()]);
    renewed_after("a renewal in phase 1", serial_now());
    renewed_after("a second renewal in phase 1", serial_now());
    let roots = roots_on_host(&certs);
    assert!(
        roots.contains(&old_root) && roots.contains(&new_root),
        "phase 1: the host trusts both roots"
    );

    // Phase 2: new CA signs, old root still trusted; the host renews with its old-root certificate.
    let bundle_old = host.path().join("old-root.pem");
    std::fs::copy(old_ca_dir.join("root-cert.pem"), &bundle_old).unwrap();
    assert!(s.term().success());
    s = start(&[
        "--ca-dir",
        new_ca_dir.to_str().unwrap(),
        "--trust-bundle",
        bundle_old.to_str().unwrap(),
    ]);
    renewed_after("a renewal in phase 2", serial_now());
    let chain = parse_pem_certs(
        &std::fs::read_to_string(certs.join("cert-chain.pem")).unwrap(),
        "chain",
    )
    .unwrap();
    isthmus_ca::ChainVerifier::new(std::slice::from_ref(&new_root), vec![])
        .unwrap()
        .verify(&chain, SystemTime::now())
        .expect("phase 2: signed by the new root");

    // Phase 3: the old root retired.
    assert!(s.term().success());
    let _s = start(&["--ca-dir", new_ca_dir.to_str().unwrap()]);
    renewed_after("a renewal in phase 3", serial_now());
    renewed_after("a second renewal in phase 3", serial_now());
    assert_eq!(
        roots_on_host(&certs),
        vec![new_root],
        "phase 3: only the new root is trusted"
    );
}
