//! Which keys and signature algorithms the CA takes in a CSR, and what it says about the
//! others. Keys ring cannot make (RSA, P-521, secp256k1) and SHA-1 signatures come from the
//! `openssl` command; those cases say so loudly and are skipped where it is missing.

use std::process::Command;

use isthmus_ca::{Ca, CaConfig, SpiffeId};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

const ID: &str = "spiffe://cluster.local/ns/algo/sa/default";
const ACCEPTED: &str = "the CA accepts ECDSA P-256/P-384, Ed25519 and RSA of 2048 to 8192 bits";

fn ca() -> (Ca, SpiffeId, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(dir.path())).unwrap();
    (ca, ID.parse().unwrap(), dir)
}

fn rcgen_csr(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A CSR made by `openssl req -new -newkey <newkey...> <extra...>`, or None (said loudly)
/// when openssl is not installed.
fn openssl_csr(args: &[&str]) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let csr = dir.path().join("csr.pem");
    let san = format!("subjectAltName=URI:{ID}");
    let run = Command::new("openssl")
        .args([
            "req", "-new", "-nodes", "-subj", "/", "-addext", &san, "-newkey",
        ])
        .args(args)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output();
    match run {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: openssl is not installed; cannot make a CSR with {args:?}");
            None
        }
        Err(e) => panic!("openssl {args:?}: {e}"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(std::fs::read_to_string(csr).unwrap())
        }
    }
}

#[test]
fn signs_every_accepted_key_type() {
    let (ca, id, _dir) = ca();
    let mut csrs = vec![
        ("P-256", rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256)),
        ("P-384", rcgen_csr(&rcgen::PKCS_ECDSA_P384_SHA384)),
        ("Ed25519", rcgen_csr(&rcgen::PKCS_ED25519)),
    ];
    let openssl: [(&str, &[&str]); 4] = [
        ("RSA 2048", &["rsa:2048", "-sha256"]),
        ("RSA 3072 SHA-512", &["rsa:3072", "-sha512"]),
        (
            "RSA-PSS",
            &[
                "rsa:2048",
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
            ],
        ),
        (
            "P-384 SHA-256",
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-sha256"],
        ),
    ];
    for (name, args) in openssl {
        if let Some(csr) = openssl_csr(args) {
            csrs.push((name, csr));
        }
    }
    for (name, csr) in csrs {
        let chain = ca
            .sign_csr(&csr, &id, 3600)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(chain.len() >= 2, "{name}");
    }
}

#[test]
fn names_the_key_or_algorithm_it_refuses() {
    let (ca, id, _dir) = ca();
    let cases: [(&[&str], String); 7] = [
        (
            &["rsa:1024", "-sha256"],
            format!("the CSR's key is RSA 1024 bits; {ACCEPTED}"),
        ),
        (
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-521", "-sha256"],
            format!("the CSR's key is ECDSA P-521; {ACCEPTED}"),
        ),
        (
            &["ec", "-pkeyopt", "ec_paramgen_curve:secp256k1", "-sha256"],
            format!("the CSR's key is ECDSA secp256k1; {ACCEPTED}"),
        ),
        (
            &["rsa:2048", "-sha1"],
            "the CSR is signed with RSA with SHA-1, which is broken and refused; the CA \
             accepts ECDSA with SHA-256/SHA-384, Ed25519, and RSA (PKCS#1 v1.5 or PSS) with \
             SHA-256/384/512"
                .into(),
        ),
        (
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-sha1"],
            "the CSR is signed with ECDSA with SHA-1, which is broken and refused".into(),
        ),
        (
            &["rsa:2048", "-sha1", "-sigopt", "rsa_padding_mode:pss"],
            "the CSR is signed with RSA-PSS with SHA-1, which is broken and refused".into(),
        ),
        (
            &["rsa:2048", "-sha256", "-sigopt", "rsa_padding_mode:pss"],
            "the CSR is signed with RSA-PSS with SHA-256 and a salt of".into(),
        ),
    ];
    for (args, want) in cases {
        let Some(csr) = openssl_csr(args) else {
            continue;
        };
        let err = ca.sign_csr(&csr, &id, 3600).unwrap_err().to_string();
        assert!(err.contains(&want), "{args:?}: {err:?} lacks {want:?}");
        assert!(!err.contains("altered"), "{args:?}: {err:?}");
    }
}
