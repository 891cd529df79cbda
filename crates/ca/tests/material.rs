//! CA material on disk: generated root, plugged Istio-style intermediates, trust bundles
//! for rotation, and the errors an operator gets for bad files.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use isthmus_ca::cert::{parse_pem_certs, CertInfo};
use isthmus_ca::files::mode_of;
use isthmus_ca::{Ca, CaConfig, CaError, ChainVerifier, SpiffeId, TokenIssuer};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

fn web() -> SpiffeId {
    "spiffe://cluster.local/ns/prod/sa/web".parse().unwrap()
}

fn csr_for(id: &SpiffeId) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Writes an Istio "cacerts" directory: root → intermediate; returns the root PEM.
fn write_cacerts(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let root_key = KeyPair::generate()?;
    let root_params = ca_params("Test Root");
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, root_key);
    let inter_key = KeyPair::generate()?;
    let inter = ca_params("Test Intermediate").signed_by(&inter_key, &root_issuer)?;
    std::fs::write(dir.join("ca-cert.pem"), inter.pem())?;
    std::fs::write(dir.join("ca-key.pem"), inter_key.serialize_pem())?;
    std::fs::write(dir.join("cert-chain.pem"), inter.pem() + &root.pem())?;
    std::fs::write(dir.join("root-cert.pem"), root.pem())?;
    Ok(root.pem())
}

fn load_err(dir: &Path) -> String {
    let err: CaError = Ca::load_or_create(&CaConfig::new(dir)).unwrap_err();
    err.to_string()
}

#[test]
fn generated_material_is_owner_only_and_reused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("ca");
    let first = Ca::load_or_create(&CaConfig::new(&dir))?;
    TokenIssuer::load_or_create(&dir.join("token-key.pem"), "cluster.local")?;
    assert_eq!(mode_of(&dir), Some(0o700));
    assert_eq!(mode_of(&dir.join("ca-key.pem")), Some(0o600));
    assert_eq!(mode_of(&dir.join("token-key.pem")), Some(0o600));
    assert_eq!(mode_of(&dir.join("ca-cert.pem")), Some(0o644));

    let root = CertInfo::parse(&first.roots()[0], "root")?;
    let life = root.not_after.duration_since(SystemTime::now())?;
    assert!(
        life > Duration::from_secs(9 * 365 * 24 * 3600),
        "about 10 years"
    );
    assert!(root.is_ca && root.self_signed);

    let again = Ca::load_or_create(&CaConfig::new(&dir))?;
    assert_eq!(
        first.trust_bundle_pem(),
        again.trust_bundle_pem(),
        "same root after restart"
    );
    Ok(())
}

#[test]
fn plugged_intermediate_signs_a_chain_ending_in_the_root() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root_pem = write_cacerts(tmp.path())?;
    let ca = Ca::load_or_create(&CaConfig::new(tmp.path()))?;
    let chain = ca.sign_csr(&csr_for(&web()), &web(), 3600)?;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[2], root_pem);
    assert_eq!(ca.trust_bundle_pem(), root_pem);

    let roots = parse_pem_certs(&root_pem, "root")?;
    let leaf_and_inter = parse_pem_certs(&(chain[0].clone() + &chain[1]), "chain")?;
    let id = ChainVerifier::new(&roots, vec![])?.verify(&leaf_and_inter, SystemTime::now())?;
    assert_eq!(id, web());
    // Leaves the agent made with the bare leaf still verify: the CA knows its intermediates.
    assert_eq!(
        ca.verify_workload_chain(&leaf_and_inter[..1], SystemTime::now())?,
        web()
    );
    Ok(())
}

#[test]
fn incomplete_cacerts_name_the_missing_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cacerts(tmp.path())?;
    std::fs::remove_file(tmp.path().join("ca-key.pem"))?;
    std::fs::remove_file(tmp.path().join("root-cert.pem"))?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("has ca-cert.pem but lacks ca-key.pem, root-cert.pem"),
        "{err}"
    );
    Ok(())
}

#[test]
fn key_of_another_certificate_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cacerts(tmp.path())?;
    std::fs::write(
        tmp.path().join("ca-key.pem"),
        KeyPair::generate()?.serialize_pem(),
    )?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("ca-key.pem does not match") && err.contains("ca-cert.pem"),
        "{err}"
    );
    Ok(())
}

#[test]
fn leaf_certificate_is_not_a_ca() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cacerts(tmp.path())?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["not-a-ca.example".into()])?.self_signed(&key)?;
    std::fs::write(tmp.path().join("ca-cert.pem"), leaf.pem())?;
    std::fs::write(tmp.path().join("ca-key.pem"), key.serialize_pem())?;
    let err = load_err(tmp.path());
    assert!(err.contains("ca-cert.pem is not a CA certificate"), "{err}");
    Ok(())
}

#[test]
fn unrelated_root_breaks_the_chain() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cacerts(tmp.path())?;
    let other = ca_params("Other Root").self_signed(&KeyPair::generate()?)?;
    std::fs::write(tmp.path().join("root-cert.pem"), other.pem())?;
    std::fs::write(tmp.path().join("cert-chain.pem"), "")?;
    let err = load_err(tmp.path());
    assert!(err.contains("chain") && err.contains("is broken"), "{err}");
    Ok(())
}

#[test]
fn root_rotation_trusts_both_roots() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let old = Ca::load_or_create(&CaConfig::new(tmp.path().join("old")))?;
    let old_root = tmp.path().join("old").join("root-cert.pem");
    let old_cert = old.issue_workload(&web(), None)?;

    // Phase 2 of ROTATION.md: the new root signs, the old one stays trusted.
    let mut config = CaConfig::new(tmp.path().join("new"));
    config.trust_bundle = Some(old_root.clone());
    let new = Ca::load_or_create(&config)?;
    assert_eq!(new.roots().len(), 2);
    let chain = new.sign_csr(&csr_for(&web()), &web(), 0)?;
    assert_eq!(
        chain.len(),
        3,
        "leaf, the other root, the signing root last"
    );
    assert_eq!(chain[1], std::fs::read_to_string(&old_root)?);
    assert_eq!(chain[2], isthmus_ca::cert::cert_to_pem(&new.roots()[0]));
    // A host still holding a certificate from the old root can renew with it.
    assert_eq!(
        new.verify_workload_chain(&old_cert.chain, SystemTime::now())?,
        web()
    );
    Ok(())
}
