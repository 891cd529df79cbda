//! Onboarding a host through the real binary: `isthmus vm config` against a real server (every
//! file, variable and mode of compat.md and docs/host-layout.md), bad input refused with nothing
//! written, the archive, `isthmus join --root` (steps, layout, idempotence, a wrong root or an
//! unreachable control plane refused), and an agent configured by the joined agent.env alone
//! getting its certificate with the joined token.

mod common;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const GROUP: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: mysql, namespace: onprem}
spec:
  metadata: {labels: {app: mysql}}
  template: {serviceAccount: mysql-sa, ports: {mysql: 3306, http: 8080}}
";

fn apply(s: &Server, yaml: &str) {
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GET on the admin API, as JSON.
fn api_get(s: &Server, path: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = s
            .http()
            .get(s.url(path))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.unwrap()
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `NAME=VALUE` lines, in order, with no duplicates.
fn env_map(p: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in read(p)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (k, v) = l
            .split_once('=')
            .unwrap_or_else(|| panic!("{l:?} in {}", p.display()));
        assert!(
            m.insert(k.to_string(), v.to_string()).is_none(),
            "{k} twice in {}",
            p.display()
        );
    }
    m
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn grpc_addr(s: &Server) -> String {
    s.grpc.trim_start_matches("https://").to_string()
}

fn tokens(s: &Server) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["token", "list", "-o", "json"])).unwrap();
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Runs `isthmus join` (no server connection needed); returns (success, stdout, stderr).
fn join(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("join")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A throwaway root with the account files useradd needs (copied from the machine, so the real
/// ids taken there are taken here too).
fn fake_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow", "login.defs"] {
        let _ = std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f));
    }
    root
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn can_useradd() -> bool {
    is_root() && Command::new("useradd").arg("--help").output().is_ok()
}

#[test]
fn vm_config_writes_the_seed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("cp"), &["--service-cidr", "10.100.0.0/16"]);
    apply(&s, GROUP);

    // What the server says about itself.
    let mesh = api_get(&s, "/api/v1/mesh");
    assert_eq!(mesh["serviceCidr"], "10.100.0.0/16");
    assert_eq!(mesh["trustDomain"], "cluster.local");
    assert_eq!(mesh["domain"], "cluster.local");
    assert_eq!(mesh["advertisedIps"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(mesh["grpcAddr"].as_str().unwrap(), grpc_addr(&s));
    assert_eq!(mesh["dnsAddr"].as_str().unwrap(), s.dns);
    assert_eq!(mesh["caServerName"], "istiod.istio-system.svc");

    let dir = tmp.path().join("mysql-vm");
    let stdout = s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "--group",
        "mysql",
        "-o",
        dir.to_str().unwrap(),
        "--ip",
        "10.0.0.9",
        "--token-ttl",
        "2h",
        "--token-uses",
        "1",
        "--bootstrap-certs",
    ]);
    assert!(
        stdout.contains("next, on the host: isthmus join"),
        "{stdout}"
    );
    // The test's control plane is on loopback: a real host could not reach it, and is told so.
    assert!(
        stdout.contains("warning: CA_ADDR 127.0.0.1:") && stdout.contains("--control-plane"),
        "{stdout}"
    );
    assert_eq!(
        mode(&dir),
        0o700,
        "the directory holds the token and the key"
    );

    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "agent.env",
            "cert-chain.pem",
            "cluster.env",
            "hosts",
            "key.pem",
            "kubedns",
            "root-cert.pem",
            "sidecar.env",
            "token"
        ]
    );
    for (f, m) in [
        ("agent.env", 0o644),
        ("cluster.env", 0o644),
        ("sidecar.env", 0o644),
        ("kubedns", 0o644),
        ("hosts", 0o644),
        ("root-cert.pem", 0o644),
        ("cert-chain.pem", 0o644),
        ("token", 0o600),
        ("key.pem", 0o600),
    ] {
        assert_eq!(mode(&dir.join(f)), m, "mode of {f}");
    }

    let ca_addr = format!("https://{}", grpc_addr(&s));
    // cluster.env: the seeds' variables; the identity from the group's template.
    assert_eq!(
        env_map(&dir.join("cluster.env")),
        map(&[
            ("ISTIO_SERVICE_CIDR", "10.100.0.0/16"),
            ("ISTIO_SYSTEM_NAMESPACE", "istio-system"),
            ("ISTIO_CP_AUTH", "MUTUAL_TLS"),
            ("ISTIO_NAMESPACE", "onprem"),
            ("SERVICE_ACCOUNT", "mysql-sa"),
            ("TRUST_DOMAIN", "cluster.local"),
            ("CA_ADDR", &ca_addr),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_LOCAL_EXCLUDE_PORTS", "15090,15021,15020"),
            ("ISTIO_SVC_IP", "10.0.0.9"),
        ])
    );
    // sidecar.env: the group's template ports.
    assert_eq!(
        env_map(&dir.join("sidecar.env")),
        map(&[
            ("ISTIO_INBOUND_PORTS", "3306,8080"),
            ("ISTIO_INBOUND_INTERCEPTION_MODE", "REDIRECT"),
        ])
    );
    // agent.env: docs/host-layout.md, the host's real paths.
    assert_eq!(
        env_map(&dir.join("agent.env")),
        map(&[
            ("CA_ADDR", &ca_addr),
            ("ISTHMUS_CA_SERVER_NAME", "istiod.istio-system.svc"),
            ("ISTHMUS_CERT_DIR", "/etc/certs"),
            ("ISTHMUS_JOIN_TOKEN_FILE", "/etc/isthmus/token"),
            ("ISTHMUS_STATE_DIR", "/var/lib/isthmus"),
            ("ISTHMUS_DOMAIN", "cluster.local"),
            ("ISTHMUS_PROXY", "true"),
            ("ISTHMUS_CAPTURE", "true"),
            ("ISTHMUS_WORKLOAD_GROUP", "mysql"),
            ("ISTIO_SVC_IP", "10.0.0.9"),
        ])
    );
    // kubedns: mesh names to the mesh DNS (non-53 port as dnsmasq's `#port`), every seed
    // control-plane name with and without .istio-system to the control plane.
    let (dns_ip, dns_port) = s.dns.rsplit_once(':').unwrap();
    let mut expected = vec![format!("server=/svc.cluster.local/{dns_ip}#{dns_port}")];
    for n in [
        "istiod",
        "istio-pilot",
        "istio-citadel",
        "istio-ca",
        "istio-policy",
        "istio-telemetry",
    ] {
        expected.push(format!("address=/{n}/127.0.0.1"));
        expected.push(format!("address=/{n}.istio-system/127.0.0.1"));
    }
    assert_eq!(
        read(&dir.join("kubedns")).lines().collect::<Vec<_>>(),
        expected
    );
    assert_eq!(
        read(&dir.join("hosts")),
        "127.0.0.1 istiod.istio-system.svc\n"
    );

    // root-cert.pem is the server's trust bundle; the bootstrap pair is for the identity.
    let root = api_get(&s, "/api/v1/ca/root");
    assert_eq!(
        read(&dir.join("root-cert.pem")),
        root["rootCert"].as_str().unwrap()
    );
    let chain =
        isthmus_ca::cert::parse_pem_certs(&read(&dir.join("cert-chain.pem")), "chain").unwrap();
    let leaf = isthmus_ca::CertInfo::parse(&chain[0], "leaf").unwrap();
    assert_eq!(
        leaf.spiffe_id().unwrap().to_string(),
        "spiffe://cluster.local/ns/onprem/sa/mysql-sa"
    );
    assert!(read(&dir.join("key.pem")).contains("PRIVATE KEY"));

    // The token: one use, two hours, the group's identity.
    let tokens = tokens(&s);
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(
        tokens[0]["identity"],
        "spiffe://cluster.local/ns/onprem/sa/mysql-sa"
    );
    assert_eq!(tokens[0]["maxUses"], 1);
    let ttl = tokens[0]["expiresAt"].as_u64().unwrap() - tokens[0]["issuedAt"].as_u64().unwrap();
    assert_eq!(ttl, 7200);
    assert!(!read(&dir.join("token")).trim().is_empty());

    // The interception rules read the two env files as written.
    let rules = s.ok(&[
        "iptables",
        "--dry-run",
        "--cluster-env",
        dir.join("cluster.env").to_str().unwrap(),
        "--sidecar-env",
        dir.join("sidecar.env").to_str().unwrap(),
    ]);
    assert!(rules.contains("-d 10.100.0.0/16"), "{rules}");
    assert!(rules.contains("3306") && rules.contains("8080"), "{rules}");

    // Without a group: -s, --inbound-ports as given, no group in agent.env; --control-plane.
    let dir2 = tmp.path().join("plain");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "-s",
        "web",
        "-o",
        dir2.to_str().unwrap(),
        "--inbound-ports",
        "9090,80",
        "--control-plane",
        "127.0.0.1:4444",
    ]);
    assert_eq!(
        env_map(&dir2.join("sidecar.env"))["ISTIO_INBOUND_PORTS"],
        "80,9090"
    );
    let agent = env_map(&dir2.join("agent.env"));
    assert_eq!(agent["CA_ADDR"], "https://127.0.0.1:4444");
    assert!(!agent.contains_key("ISTHMUS_WORKLOAD_GROUP") && !agent.contains_key("ISTIO_SVC_IP"));
    assert_eq!(env_map(&dir2.join("cluster.env"))["SERVICE_ACCOUNT"], "web");
    assert!(!dir2.join("key.pem").exists() && !dir2.join("cert-chain.pem").exists());
}

#[test]
fn vm_config_refuses_bad_input_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    apply(&s, GROUP);
    let dir = tmp.path().join("out");
    let o = dir.to_str().unwrap();
    let archive = tmp.path().join("out.tar.gz");
    let a = archive.to_str().unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-n", "onprem", "--group", "nope"],
            "WorkloadGroup onprem/nope not found",
        ),
        (vec!["-n", "Bad_NS"], "--namespace \"Bad_NS\""),
        (
            vec!["-n", "onprem", "-s", "Not Valid"],
            "--service-account \"Not Valid\"",
        ),
        (
            vec!["-n", "onprem", "--inbound-ports", "80,http"],
            "--inbound-ports \"80,http\"",
        ),
        (
            vec!["-n", "onprem", "--control-plane", "istiod"],
            "--control-plane \"istiod\"",
        ),
        (
            vec!["-n", "onprem", "--token-ttl", "soon"],
            "--token-ttl \"soon\"",
        ),
        (
            vec!["-n", "onprem", "--group", "mysql", "-s", "other"],
            "differs from WorkloadGroup onprem/mysql",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["vm", "config", "-o", o, "--archive", a];
        full.extend(args);
        let err = s.fails(&full);
        assert!(
            err.contains(expected),
            "{full:?}: expected {expected:?} in {err}"
        );
        assert!(
            !dir.exists() && !archive.exists(),
            "{full:?} left output behind"
        );
    }

    // An unreachable server: a clear error, nothing written.
    let out = Command::new(BIN)
        .args(["vm", "config", "-n", "onprem", "-o", o])
        .env("ISTHMUS_SERVER", "http://127.0.0.1:1")
        .env("ISTHMUS_TOKEN", "x")
        .env("XDG_CONFIG_HOME", s.home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach the control plane at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(!dir.exists());

    // A directory in the way is not touched.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("mine"), "keep").unwrap();
    let err = s.fails(&["vm", "config", "-n", "onprem", "-o", o]);
    assert!(err.contains("already exists and is not empty"), "{err}");
    assert_eq!(read(&dir.join("mine")), "keep");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    // No failed attempt left a token behind.
    assert_eq!(tokens(&s).len(), 0, "{:?}", tokens(&s));
    // Neither a temporary directory.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".isthmus"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn archive_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let dir = tmp.path().join("vm");
    let archive = tmp.path().join("vm.tar.gz");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "-s",
        "mysql",
        "-o",
        dir.to_str().unwrap(),
        "--archive",
        archive.to_str().unwrap(),
        "--inbound-ports",
        "3306",
        "--bootstrap-certs",
    ]);
    assert_eq!(mode(&archive), 0o600);
    // The archive alone, too.
    let only = tmp.path().join("only.tar.gz");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "--archive",
        only.to_str().unwrap(),
    ]);
    assert_eq!(mode(&only), 0o600);

    // Listed with the modes of the directory, under one top directory.
    let listing = Command::new("tar")
        .args(["tzvf"])
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("-rw------- 0/0") && listing.contains("vm/token"),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rw-------") && l.ends_with("vm/key.pem")),
        "{listing}"
    );

    // Joined from the archive, the host holds exactly the directory's files.
    let root = fake_root(tmp.path());
    let (ok, out, err) = join(&[
        archive.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    for (name, path) in [
        ("agent.env", "etc/isthmus/agent.env"),
        ("token", "etc/isthmus/token"),
        ("sidecar.env", "var/lib/istio/envoy/sidecar.env"),
        ("root-cert.pem", "etc/certs/root-cert.pem"),
        ("key.pem", "etc/certs/key.pem"),
        ("cert-chain.pem", "etc/certs/cert-chain.pem"),
    ] {
        assert_eq!(read(&root.join(path)), read(&dir.join(name)), "{path}");
    }
    let cluster = read(&root.join("var/lib/istio/envoy/cluster.env"));
    assert!(
        cluster.starts_with(&read(&dir.join("cluster.env"))),
        "{cluster}"
    );

    // A file that is no bundle is refused by name.
    std::fs::write(tmp.path().join("junk.tar.gz"), "not gzip").unwrap();
    let (ok, out, _) = join(&[
        tmp.path().join("junk.tar.gz").to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(out.starts_with("FAIL read the bundle"), "{out}");
}

#[test]
fn join_installs_the_layout_and_reruns_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let dir = tmp.path().join("vm");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "-s",
        "mysql",
        "-o",
        dir.to_str().unwrap(),
        "--inbound-ports",
        "3306",
    ]);
    let root = fake_root(tmp.path());
    std::fs::create_dir_all(root.join("etc/dnsmasq.d")).unwrap();
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n10.1.1.1 old-cp # isthmus\n",
    )
    .unwrap();
    let r = root.to_str().unwrap();

    let (ok, first, err) = join(&[dir.to_str().unwrap(), "--root", r, "--no-start"]);
    assert!(ok, "{first}{err}");
    let lines: Vec<&str> = first.lines().collect();
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("ok ") || l.starts_with("skip ")),
        "{first}"
    );
    let expect_in_order = [
        "ok   read the bundle",
        "ok   control plane at 127.0.0.1:",
        "istio-proxy",
        "ok   directory",
        "etc/isthmus/agent.env (0644)",
        "etc/isthmus/token (0600",
        "var/lib/istio/envoy/cluster.env (0644)",
        "var/lib/istio/envoy/sidecar.env (0644)",
        "etc/certs/root-cert.pem (0644)",
        "etc/dnsmasq.d/kubedns (0644)",
        "etc/hosts: control-plane names added",
        "skip start the agent (--no-start); to run it: ",
    ];
    let mut at = 0;
    for e in expect_in_order {
        let found = lines[at..].iter().position(|l| l.contains(e));
        let i = found.unwrap_or_else(|| panic!("{e:?} not reported (in order) in:\n{first}"));
        at += i + 1;
    }
    if can_useradd() {
        assert!(
            first.contains("ok   created user and group istio-proxy (uid "),
            "{first}"
        );
    } else {
        assert!(first.contains("skip create user istio-proxy"), "{first}");
    }

    // The layout: paths and modes (owners when root could set them).
    for (path, m) in [
        ("etc/isthmus/agent.env", 0o644),
        ("etc/isthmus/token", 0o600),
        ("var/lib/istio/envoy/cluster.env", 0o644),
        ("var/lib/istio/envoy/sidecar.env", 0o644),
        ("etc/certs/root-cert.pem", 0o644),
        ("etc/dnsmasq.d/kubedns", 0o644),
        ("var/lib/isthmus", 0o750),
        ("etc/certs", 0o755),
    ] {
        assert_eq!(mode(&root.join(path)), m, "mode of /{path}");
    }
    assert!(
        !root.join("etc/certs/key.pem").exists(),
        "no bootstrap certs were asked for"
    );
    assert_eq!(
        read(&root.join("etc/dnsmasq.d/kubedns")),
        read(&dir.join("kubedns"))
    );
    if can_useradd() {
        use std::os::unix::fs::MetadataExt;
        let passwd = read(&root.join("etc/passwd"));
        let line = passwd
            .lines()
            .find(|l| l.starts_with("istio-proxy:"))
            .unwrap();
        let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
        let token = std::fs::metadata(root.join("etc/isthmus/token")).unwrap();
        assert_eq!(token.uid(), uid);
        assert_eq!(
            std::fs::metadata(root.join("var/lib/isthmus"))
                .unwrap()
                .uid(),
            uid
        );
        assert_eq!(
            std::fs::metadata(root.join("etc/isthmus/agent.env"))
                .unwrap()
                .uid(),
            0
        );
        let cluster = read(&root.join("var/lib/istio/envoy/cluster.env"));
        assert_eq!(
            cluster.contains("ISTHMUS_PROXY_UID="),
            uid != 1337,
            "{cluster}"
        );
        // The real machine was not touched.
        assert!(!read(Path::new("/etc/passwd")).contains("istio-proxy:x:") || uid != 0);
    }
    let hosts = read(&root.join("etc/hosts"));
    assert_eq!(
        hosts,
        "127.0.0.1 localhost\n127.0.0.1 istiod.istio-system.svc # isthmus\n"
    );

    // Again: the same result, nothing duplicated, every file unchanged.
    let (ok, second, err) = join(&[dir.to_str().unwrap(), "--root", r, "--no-start"]);
    assert!(ok, "{second}{err}");
    assert_eq!(read(&root.join("etc/hosts")), hosts);
    assert!(
        second.contains("control-plane names already there"),
        "{second}"
    );
    for l in second
        .lines()
        .filter(|l| l.starts_with("ok   /") && !l.contains("/etc/hosts"))
    {
        assert!(l.ends_with(", unchanged"), "{l}");
    }
    if can_useradd() {
        assert!(
            second.contains("ok   user and group istio-proxy exist"),
            "{second}"
        );
        let passwd = read(&root.join("etc/passwd"));
        assert_eq!(passwd.matches("istio-proxy:").count(), 1, "{passwd}");
    }

    // No dnsmasq: kubedns skipped with the reason.
    let root2 = tmp.path().join("root2");
    std::fs::create_dir_all(&root2).unwrap();
    let (ok, out, err) = join(&[
        dir.to_str().unwrap(),
        "--root",
        root2.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("kubedns: dnsmasq is not installed"), "{out}");
    assert!(out.contains("skip create user istio-proxy:"), "{out}");
    assert!(!root2.join("etc/dnsmasq.d").exists());
}

#[test]
fn join_refuses_a_wrong_root_and_an_unreachable_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let other = Server::start(&tmp.path().join("other"));
    let dir = tmp.path().join("vm");
    s.ok(&["vm", "config", "-n", "onprem", "-o", dir.to_str().unwrap()]);
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let r = root.to_str().unwrap();

    // The bundle's root is another control plane's.
    let other_root = api_get(&other, "/api/v1/ca/root");
    let wrong = tmp.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), wrong.join(e.file_name())).unwrap();
    }
    std::fs::write(
        wrong.join("root-cert.pem"),
        other_root["rootCert"].as_str().unwrap(),
    )
    .unwrap();
    let (ok, out, err) = join(&[wrong.to_str().unwrap(), "--root", r, "--no-start"]);
    assert!(!ok, "{out}");
    let addr = grpc_addr(&s);
    let fail = out
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        fail.contains(&format!(
            "control plane at {addr} presents a certificate issued by"
        )),
        "{fail}"
    );
    assert!(
        fail.contains("does not chain to the bundle's root-cert.pem"),
        "{fail}"
    );
    assert!(err.contains("join failed"), "{err}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "nothing installed"
    );

    // The control plane is gone.
    drop(s);
    let (ok, out, _) = join(&[
        dir.to_str().unwrap(),
        "--root",
        r,
        "--no-start",
        "--timeout",
        "2s",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL control plane at {addr} (CA_ADDR in agent.env) is unreachable"
        )),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "nothing installed"
    );
}

#[test]
fn joined_host_agent_gets_its_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let dir = tmp.path().join("vm");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "-s",
        "mysql",
        "-o",
        dir.to_str().unwrap(),
        "--token-uses",
        "1",
    ]);
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let (ok, out, err) = join(&[
        dir.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");

    // agent.env is the whole configuration: paths moved under the root, the listeners on free
    // loopback ports, and no proxy or capture (they need fixed ports and root).
    let mut env = env_map(&root.join("etc/isthmus/agent.env"));
    for k in [
        "ISTHMUS_CERT_DIR",
        "ISTHMUS_JOIN_TOKEN_FILE",
        "ISTHMUS_STATE_DIR",
    ] {
        let v = root.join(env[k].trim_start_matches('/'));
        env.insert(k.into(), v.display().to_string());
    }
    env.insert("ISTHMUS_PROXY".into(), "false".into());
    env.insert("ISTHMUS_CAPTURE".into(), "false".into());
    for k in [
        "ISTHMUS_AGENT_METRICS_ADDR",
        "ISTHMUS_AGENT_DNS_ADDR",
        "ISTHMUS_AGENT_ADMIN_ADDR",
        "ISTHMUS_AGENT_READINESS_ADDR",
    ] {
        env.insert(k.into(), "127.0.0.1:0".into());
    }
    let mut child = Command::new(BIN)
        .arg("agent")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ISTHMUS_LOG", "warn")
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let chain_path = root.join("etc/certs/cert-chain.pem");
    let chain = wait_for("the agent's certificate", Duration::from_secs(30), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("agent exited early with {st}");
        }
        let pem = std::fs::read_to_string(&chain_path).ok()?;
        isthmus_ca::cert::parse_pem_certs(&pem, "chain")
            .ok()
            .filter(|c| !c.is_empty())
    });
    let _ = child.kill();
    let _ = child.wait();
    let leaf = isthmus_ca::CertInfo::parse(&chain[0], "leaf").unwrap();
    assert_eq!(
        leaf.spiffe_id().unwrap().to_string(),
        "spiffe://cluster.local/ns/onprem/sa/mysql"
    );
    assert_eq!(mode(&root.join("etc/certs/key.pem")), 0o600);
    // With the joined token: its one use is spent.
    let tokens = tokens(&s);
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["uses"], 1, "{tokens:?}");
}
