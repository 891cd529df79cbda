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
            ("ISTHMUS_VIP_CIDR", "10.100.0.0/16"),
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

    assert_eq!(
        run_joined_agent(&root),
        "spiffe://cluster.local/ns/onprem/sa/mysql"
    );
    assert_eq!(mode(&root.join("etc/certs/key.pem")), 0o600);
    // With the joined token: its one use is spent.
    let tokens = tokens(&s);
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["uses"], 1, "{tokens:?}");
}

/// Runs the agent of a host joined under `root` until it has its certificate; returns the
/// certificate's identity.
fn run_joined_agent(root: &Path) -> String {
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
    leaf.spiffe_id().unwrap().to_string()
}

/// The pin of the server's (one) root, computed here from the admin API's root certificate.
fn root_pin(s: &Server) -> String {
    let pem = api_get(s, "/api/v1/ca/root")["rootCert"]
        .as_str()
        .unwrap()
        .to_string();
    let roots = isthmus_ca::cert::parse_pem_certs(&pem, "root").unwrap();
    assert_eq!(roots.len(), 1);
    isthmus_ca::root_hash(&roots[0])
}

/// `token create -o json`: (token, id).
fn create_token(s: &Server, args: &[&str]) -> (String, String) {
    let mut full = vec!["token", "create", "-o", "json"];
    full.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&s.ok(&full)).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    )
}

fn token_entry(s: &Server, id: &str) -> serde_json::Value {
    tokens(s)
        .into_iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("token {id} not listed"))
}

/// Every file and directory under `root`: relative path → (mode, contents).
fn installed(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(rel, (mode(&path), Vec::new()));
                walk(base, &path, out);
            } else {
                out.insert(rel, (mode(&path), std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_in_order(output: &str, expected: &[&str]) {
    let lines: Vec<&str> = output.lines().collect();
    let mut at = 0;
    for e in expected {
        let i = lines[at..]
            .iter()
            .position(|l| l.contains(e))
            .unwrap_or_else(|| panic!("{e:?} not reported (in order) in:\n{output}"));
        at += i + 1;
    }
}

#[test]
fn join_server_installs_what_vm_config_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    apply(&s, GROUP);
    let addr = grpc_addr(&s);
    let pin = root_pin(&s);

    // vm config's own token records the group: --server installs exactly the directory's files.
    let dir = tmp.path().join("vm");
    let stdout = s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "--group",
        "mysql",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(
        stdout.contains(&format!(
            "isthmus join --server {addr} --token @{}; it pins the root {pin}",
            dir.join("token").display()
        )),
        "{stdout}"
    );
    let vm_token_id = tokens(&s)[0]["id"].as_str().unwrap().to_string();
    let from_dir = tmp.path().join("from-dir");
    let from_server = tmp.path().join("from-server");
    std::fs::create_dir_all(&from_dir).unwrap();
    std::fs::create_dir_all(&from_server).unwrap();
    let (ok, out, err) = join(&[
        dir.to_str().unwrap(),
        "--root",
        from_dir.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    let token_file = format!("@{}", dir.join("token").display());
    let (ok, out, err) = join(&[
        "--server",
        &addr,
        "--token",
        &token_file,
        "--root",
        from_server.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.lines()
            .all(|l| l.starts_with("ok ") || l.starts_with("skip ")),
        "{out}"
    );
    assert_in_order(
        &out,
        &[
            &format!(
                "ok   join token {vm_token_id} for spiffe://cluster.local/ns/onprem/sa/mysql-sa (WorkloadGroup mysql); pinned root {pin} (from the join token)"
            ),
            &format!("ok   control plane at {addr} serves the pinned root {pin} \"O=cluster.local, CN=Isthmus mesh root CA"),
            &format!(
                "ok   fetched the bundle for spiffe://cluster.local/ns/onprem/sa/mysql-sa from {addr} (7 files; token {vm_token_id} checked, no use spent), over TLS verified against the pinned root"
            ),
            &format!("ok   control plane at {addr} is reachable and its certificate (istiod.istio-system.svc) chains"),
            "etc/isthmus/agent.env (0644)",
            "etc/isthmus/token (0600",
            "var/lib/istio/envoy/sidecar.env (0644)",
            "etc/hosts: control-plane names added",
            "skip start the agent (--no-start)",
        ],
    );
    let by_server = installed(&from_server);
    assert_eq!(by_server, installed(&from_dir));
    assert_eq!(
        env_map(&from_server.join("var/lib/istio/envoy/sidecar.env"))["ISTIO_INBOUND_PORTS"],
        "3306,8080"
    );
    assert_eq!(
        env_map(&from_server.join("etc/isthmus/agent.env"))["ISTHMUS_WORKLOAD_GROUP"],
        "mysql"
    );

    // A token from `token create` (no group) with the pin given by hand, in capitals: vm
    // config's files for that identity, but for the token.
    let out = s.cli(&["token", "create", "-n", "onprem", "-s", "web"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains(&format!("it pins the mesh root {pin}")),
        "{note}"
    );
    let dir2 = tmp.path().join("web");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "-s",
        "web",
        "-o",
        dir2.to_str().unwrap(),
    ]);
    let (a, b) = (tmp.path().join("web-dir"), tmp.path().join("web-server"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (ok, out, err) = join(&[
        dir2.to_str().unwrap(),
        "--root",
        a.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    let shouted = pin.to_uppercase();
    let (ok, out, err) = join(&[
        "--server",
        &addr,
        "--token",
        &token,
        "--root-hash",
        &shouted,
        "--root",
        b.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("pinned root {pin} (from --root-hash)")),
        "{out}"
    );
    let (mut by_dir, mut by_server) = (installed(&a), installed(&b));
    let token_path = "etc/isthmus/token".to_string();
    assert_eq!(
        by_server.remove(&token_path).unwrap(),
        (0o600, token.clone().into_bytes())
    );
    let (_, vm_config_token) = by_dir.remove(&token_path).unwrap();
    assert_ne!(vm_config_token, token.clone().into_bytes());
    assert_eq!(by_server, by_dir);
}

#[test]
fn join_server_refuses_and_installs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let other = Server::start(&tmp.path().join("other"));
    let addr = grpc_addr(&s);
    let (pin, other_pin) = (root_pin(&s), root_pin(&other));
    assert_ne!(pin, other_pin);
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let r = root.to_str().unwrap().to_string();
    let refused = |args: &[&str]| -> String {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--root", &r, "--no-start", "--timeout", "5s"]);
        let (ok, out, err) = join(&full);
        assert!(!ok, "{args:?} should fail: {out}");
        assert!(err.contains("join failed"), "{err}");
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "{args:?} installed something"
        );
        out.lines()
            .find(|l| l.starts_with("FAIL"))
            .unwrap_or_else(|| panic!("{args:?}: no FAIL line in {out}"))
            .to_string()
    };
    let (good, good_id) = create_token(&s, &["-n", "onprem", "-s", "mysql", "--uses", "1"]);

    // A pin that is not this control plane's root: named, with what it serves.
    let fail = refused(&[
        "--server",
        &addr,
        "--token",
        &good,
        "--root-hash",
        &other_pin,
    ]);
    assert!(fail.contains("root hash mismatch"), "{fail}");
    assert!(
        fail.contains(&format!("serves {pin} "))
            && fail.contains(&format!(
                "the pinned root is {other_pin} (from --root-hash)"
            )),
        "{fail}"
    );
    // A token made by another control plane pins that one's root.
    let (foreign, _) = create_token(&other, &["-n", "onprem", "-s", "mysql"]);
    let fail = refused(&["--server", &addr, "--token", &foreign]);
    assert!(
        fail.contains("root hash mismatch")
            && fail.contains(&format!(
                "the pinned root is {other_pin} (from the join token)"
            )),
        "{fail}"
    );
    // ... and when this root is pinned by hand, the control plane refuses the token itself.
    let fail = refused(&["--server", &addr, "--token", &foreign, "--root-hash", &pin]);
    assert!(
        fail.contains(
            "refused the join token: join token rejected: join token signature does not verify"
        ),
        "{fail}"
    );

    // Revoked.
    let (revoked, id) = create_token(&s, &["-n", "onprem", "-s", "mysql"]);
    s.ok(&["token", "revoke", &id]);
    let fail = refused(&["--server", &addr, "--token", &revoked]);
    assert!(
        fail.contains(&format!(
            "refused the join token: join token rejected: join token {id} was revoked"
        )),
        "{fail}"
    );

    // Expired.
    let (expired, id) = create_token(&s, &["-n", "onprem", "-s", "mysql", "--ttl", "1s"]);
    wait_for("the token to expire", Duration::from_secs(10), || {
        (token_entry(&s, &id)["state"] == "expired").then_some(())
    });
    let fail = refused(&["--server", &addr, "--token", &expired]);
    assert!(
        fail.contains(&format!(
            "refused the join token: join token rejected: join token {id} expired at"
        )),
        "{fail}"
    );

    // Garbage: nothing to pin from it; with a pin, the control plane says what is wrong.
    let fail = refused(&["--server", &addr, "--token", "garbage"]);
    assert!(
        fail.starts_with("FAIL read the join token: join token is malformed"),
        "{fail}"
    );
    let fail = refused(&["--server", &addr, "--token", "garbage", "--root-hash", &pin]);
    assert!(
        fail.contains("refused the join token: join token rejected: join token is malformed"),
        "{fail}"
    );
    let fail = refused(&["--server", &addr, "--token", &good, "--root-hash", "abc123"]);
    assert!(
        fail.contains("--root-hash: root hash \"abc123\" does not start with `sha256:`"),
        "{fail}"
    );
    let empty = tmp.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let fail = refused(&[
        "--server",
        &addr,
        "--token",
        &format!("@{}", empty.display()),
    ]);
    assert!(fail.contains("is empty"), "{fail}");

    // Nobody there.
    let fail = refused(&["--server", "127.0.0.1:1", "--token", &good]);
    assert!(
        fail.starts_with("FAIL control plane at 127.0.0.1:1 (--server) is unreachable: "),
        "{fail}"
    );

    // The command line: a bundle or --server, not both; --token goes with --server.
    for args in [
        vec!["join", "--root", &r],
        vec!["join", "./vm", "--server", &addr, "--token", &good],
        vec!["join", "--server", &addr],
        vec!["join", "./vm", "--token", &good],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    // None of this spent the good token's one use.
    assert_eq!(token_entry(&s, &good_id)["uses"], 0);
}

#[test]
fn join_server_spends_no_token_use() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let addr = grpc_addr(&s);
    let (token, id) = create_token(&s, &["-n", "onprem", "-s", "mysql", "--uses", "1"]);
    let file = tmp.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let token_arg = format!("@{}", file.display());
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let r = root.to_str().unwrap();
    let args = [
        "--server",
        &addr,
        "--token",
        &token_arg,
        "--root",
        r,
        "--no-start",
    ];
    let (ok, out, err) = join(&args);
    assert!(ok, "{out}{err}");
    // Again: the same result, and still no use spent.
    let (ok, again, err) = join(&args);
    assert!(ok, "{again}{err}");
    assert!(
        again.contains("etc/isthmus/agent.env (0644), unchanged"),
        "{again}"
    );
    assert_eq!(token_entry(&s, &id)["uses"], 0);

    // The agent gets its certificate with the token's one use.
    assert_eq!(
        run_joined_agent(&root),
        "spiffe://cluster.local/ns/onprem/sa/mysql"
    );
    assert_eq!(token_entry(&s, &id)["uses"], 1);
    let (ok, out, _) = join(&args);
    assert!(!ok);
    assert!(
        out.contains(&format!("FAIL the control plane at {addr} refused the join token: join token rejected: join token {id} is used up: it allowed 1 use(s)")),
        "{out}"
    );
}

/// One call of the onboarding API, trusting the server's root and checking its name.
fn onboarding_call(
    s: &Server,
    authorization: Option<&str>,
) -> Result<isthmus_control_plane::onboarding::pb::GetBundleResponse, tonic::Status> {
    use isthmus_control_plane::onboarding::pb::onboarding_client::OnboardingClient;
    use isthmus_control_plane::onboarding::pb::GetBundleRequest;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let root = api_get(s, "/api/v1/ca/root")["rootCert"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&root))
            .domain_name("istiod.istio-system.svc");
        let channel = Channel::from_shared(s.grpc.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = OnboardingClient::new(channel);
        let bundle = client
            .get_trust_bundle(isthmus_control_plane::onboarding::pb::GetTrustBundleRequest {})
            .await?
            .into_inner();
        assert_eq!(bundle.roots_pem, root);
        let mut request = tonic::Request::new(GetBundleRequest {});
        if let Some(a) = authorization {
            request
                .metadata_mut()
                .insert("authorization", a.parse().unwrap());
        }
        client.get_bundle(request).await.map(|r| r.into_inner())
    })
}

/// POST on the admin API: (status, JSON body).
fn api_post(s: &Server, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = s
            .http()
            .post(s.url(path))
            .bearer_auth(&s.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    })
}

#[test]
fn onboarding_api_checks_the_token_and_spends_no_use() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    apply(&s, GROUP);
    let refused = |auth: Option<&str>, code: tonic::Code, needle: &str| {
        let status = onboarding_call(&s, auth).unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    };
    refused(None, tonic::Code::Unauthenticated, "no join token");
    refused(
        Some("Basic abc"),
        tonic::Code::Unauthenticated,
        "authorization header is not `Bearer <token>`",
    );

    // A group token through the admin API: it carries the pin; the group must exist.
    let (status, body) = api_post(
        &s,
        "/api/v1/tokens",
        serde_json::json!({"namespace": "onprem", "group": "nope"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WorkloadGroup onprem/nope not found"),
        "{body}"
    );
    let (status, body) = api_post(
        &s,
        "/api/v1/tokens",
        serde_json::json!({"namespace": "onprem", "group": "mysql", "uses": 1}),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["identity"],
        "spiffe://cluster.local/ns/onprem/sa/mysql-sa"
    );
    assert_eq!(body["rootHashes"], serde_json::json!([root_pin(&s)]));
    let token = body["token"].as_str().unwrap().to_string();
    let id = body["id"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {token}");

    for _ in 0..2 {
        let bundle = onboarding_call(&s, Some(&bearer)).unwrap();
        assert_eq!(
            bundle.identity,
            "spiffe://cluster.local/ns/onprem/sa/mysql-sa"
        );
        assert_eq!(bundle.token_id, id);
        let files: BTreeMap<&str, (u32, &[u8])> = bundle
            .files
            .iter()
            .map(|f| (f.name.as_str(), (f.mode, f.contents.as_slice())))
            .collect();
        assert_eq!(
            files.keys().copied().collect::<Vec<_>>(),
            [
                "agent.env",
                "cluster.env",
                "hosts",
                "kubedns",
                "root-cert.pem",
                "sidecar.env",
                "token"
            ]
        );
        assert_eq!(files["token"], (0o600, token.as_bytes()));
        assert_eq!(files["cluster.env"].0, 0o644);
        let sidecar = String::from_utf8_lossy(files["sidecar.env"].1);
        assert!(
            sidecar.contains("ISTIO_INBOUND_PORTS=3306,8080"),
            "{sidecar}"
        );
    }
    assert_eq!(token_entry(&s, &id)["uses"], 0);

    // The group went away: said so, not a bundle without it.
    s.ok(&["delete", "workloadgroup", "mysql", "-n", "onprem"]);
    refused(
        Some(&bearer),
        tonic::Code::FailedPrecondition,
        "WorkloadGroup onprem/mysql, which the join token names, does not exist",
    );

    // Every call counted by method and outcome: five calls, each reading the trust bundle
    // first; two refused without a token, two served, one refused for the group.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let metrics = rt.block_on(async {
        let url = format!("{}/metrics", s.metrics);
        s.http()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for (series, n) in [
        ("method=\"GetTrustBundle\",outcome=\"served\"", 5),
        ("method=\"GetBundle\",outcome=\"Unauthenticated\"", 2),
        ("method=\"GetBundle\",outcome=\"served\"", 2),
        ("method=\"GetBundle\",outcome=\"FailedPrecondition\"", 1),
    ] {
        let line = format!("isthmus_onboarding_requests_total{{{series}}} {n}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }
}

/// `token create --group`: the token takes the group's service account, and `join --server`
/// with it installs the group's inbound ports; a group that does not exist, or disagrees with
/// `-s`, is refused with the reason.
#[test]
fn token_create_group_carries_the_group_to_join_server() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    apply(&s, GROUP);
    let addr = grpc_addr(&s);

    let err = s.fails(&["token", "create", "-n", "onprem", "--group", "nope"]);
    assert!(err.contains("WorkloadGroup onprem/nope not found"), "{err}");
    let err = s.fails(&[
        "token", "create", "-n", "onprem", "-s", "other", "--group", "mysql",
    ]);
    assert!(
        err.contains("differs from WorkloadGroup onprem/mysql"),
        "{err}"
    );

    let (token, id) = create_token(&s, &["-n", "onprem", "--group", "mysql", "--uses", "1"]);
    let entry = token_entry(&s, &id);
    assert_eq!(entry["serviceAccount"], "mysql-sa", "{entry}");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let (ok, out, err) = join(&[
        "--server",
        &addr,
        "--token",
        &token,
        "--root",
        root.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    let sidecar = env_map(&root.join("var/lib/istio/envoy/sidecar.env"));
    assert_eq!(sidecar["ISTIO_INBOUND_PORTS"], "3306,8080", "{sidecar:?}");
    let cluster = env_map(&root.join("var/lib/istio/envoy/cluster.env"));
    assert_eq!(cluster["SERVICE_ACCOUNT"], "mysql-sa", "{cluster:?}");
    assert_eq!(token_entry(&s, &id)["uses"], 0);
}

#[test]
fn join_checks_the_bundle_token_and_makes_its_root() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let addr = grpc_addr(&s);

    // A bundle whose token was revoked: refused before anything is made or installed.
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
    ]);
    let ids: Vec<String> = tokens(&s)
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1);
    s.ok(&["token", "revoke", &ids[0]]);
    let root = tmp.path().join("new").join("root");
    let (ok, out, _) = join(&[
        dir.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL the control plane at {addr} refused the bundle's join token: "
        )),
        "{out}"
    );
    assert!(out.contains("revoked"), "{out}");
    assert!(
        out.contains("make a new bundle with `isthmus vm config`"),
        "{out}"
    );
    assert!(!root.exists(), "a failed join makes no --root");
    assert_eq!(token_entry(&s, &ids[0])["uses"], 0);

    // A good bundle, into a --root that does not exist yet: made, the token checked with no
    // use spent, and the printed command runs the agent on the files under that root.
    let dir = tmp.path().join("vm2");
    s.ok(&[
        "vm",
        "config",
        "-n",
        "onprem",
        "-s",
        "mysql",
        "-o",
        dir.to_str().unwrap(),
    ]);
    let (ok, out, err) = join(&[
        dir.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("ok   created --root {}", root.display())),
        "{out}"
    );
    assert!(
        out.contains("is valid (checked with the control plane, no use spent)"),
        "{out}"
    );
    let fresh = tokens(&s).into_iter().find(|t| t["id"] != ids[0]).unwrap();
    assert_eq!(fresh["uses"], 0);
    let start = out
        .lines()
        .find(|l| l.contains("to run it: "))
        .unwrap_or_else(|| panic!("{out}"));
    let r = root.display();
    for part in [
        format!("ISTHMUS_CERT_DIR={r}/etc/certs"),
        format!("ISTHMUS_JOIN_TOKEN_FILE={r}/etc/isthmus/token"),
        format!("ISTHMUS_STATE_DIR={r}/var/lib/isthmus"),
        format!("ISTHMUS_CLUSTER_ENV={r}/var/lib/istio/envoy/cluster.env"),
        format!("CA_ADDR=https://{addr}"),
    ] {
        assert!(start.contains(&part), "{part} in {start}");
    }
}

#[test]
fn join_server_at_a_port_without_tls_names_the_grpc_port() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("cp"));
    let (token, _) = create_token(&s, &["-n", "onprem", "-s", "mysql"]);
    let admin = s.admin.trim_start_matches("http://").to_string();
    let root = tmp.path().join("root");
    let (ok, out, _) = join(&[
        "--server",
        &admin,
        "--token",
        &token,
        "--root",
        root.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("FAIL {admin} does not speak TLS (")),
        "{out}"
    );
    assert!(out.contains("is this the gRPC port (15012)?"), "{out}");
    assert!(!root.exists());

    // A path given as the token: the hint says @FILE.
    let (ok, out, _) = join(&[
        "--server",
        &grpc_addr(&s),
        "--token",
        "./token",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        out.contains("--token \"./token\" looks like a file, not a token: write --token @./token to read the token from that file"),
        "{out}"
    );
}
