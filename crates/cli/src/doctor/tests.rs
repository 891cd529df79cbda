//! The checks' verdicts over a fake system: real files in a temporary root, a real CA's
//! certificates, fake sockets, DNS and iptables.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use isthmus_ca::{Ca, CaConfig, SpiffeId};
use isthmus_intercept::{FakeNetfilter, FakeRouting, Family, Netfilter, Routing};
use serde_json::json;

use super::super::{run_checks, Options, Report, Status};
use super::*;

const CP: &str = "10.0.0.2";
const VIP: &str = "10.96.0.10";

type HttpAnswers = HashMap<(SocketAddr, &'static str), Result<(u16, String), String>>;

struct Fake {
    now: SystemTime,
    tls: TlsOutcome,
    http: HttpAnswers,
    dns: HashMap<SocketAddr, Result<Vec<IpAddr>, DnsFailure>>,
    dial: Result<DialOutcome, String>,
    nf: FakeNetfilter,
    rt: FakeRouting,
    dialed: std::sync::Mutex<Vec<(SocketAddr, Option<String>)>>,
}

impl Probes for Fake {
    fn now(&self) -> SystemTime {
        self.now
    }
    async fn tls(&self, _: SocketAddr, _: &str, _: &[CertificateDer<'static>]) -> TlsOutcome {
        self.tls.clone()
    }
    async fn resolve_host(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        Ok(SocketAddr::new(
            host.parse().map_err(|_| "unknown host")?,
            port,
        ))
    }
    async fn http_get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        self.http
            .iter()
            .find(|((a, p), _)| *a == addr && *p == path)
            .map_or(Err("connection refused".into()), |(_, r)| r.clone())
    }
    async fn dns(&self, server: SocketAddr, _: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        self.dns
            .get(&server)
            .cloned()
            .unwrap_or(Err(DnsFailure::Unanswered("timed out".into())))
    }
    async fn dial(&self, addr: SocketAddr, host: Option<&str>) -> Result<DialOutcome, String> {
        self.dialed
            .lock()
            .unwrap()
            .push((addr, host.map(str::to_string)));
        self.dial.clone()
    }
    fn netfilter(&self) -> &dyn Netfilter {
        &self.nf
    }
    fn routing(&self) -> &dyn Routing {
        &self.rt
    }
}

use rustls::pki_types::CertificateDer;

struct Host {
    root: tempfile::TempDir,
    ca: Ca,
    _ca_dir: tempfile::TempDir,
}

fn write(root: &Path, host_path: &str, text: &str) {
    let p = under(root, Path::new(host_path));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
}

fn token(exp: SystemTime) -> String {
    let claims = json!({"iss": "isthmus", "aud": "isthmus-ca", "sub": "spiffe://cluster.local/ns/onprem/sa/mysql",
        "ns": "onprem", "sa": "mysql", "iat": 0, "jti": "tok123",
        "exp": exp.duration_since(UNIX_EPOCH).unwrap().as_secs()});
    let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.sig", b("{}"), b(&claims.to_string()))
}

const CLUSTER: &str = "ISTIO_SERVICE_CIDR=10.96.0.0/12\nISTIO_META_DNS_CAPTURE=true\n";

fn host() -> Host {
    let root = tempfile::tempdir().unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(ca_dir.path())).unwrap();
    let r = root.path();
    write(
        r,
        AGENT_ENV,
        &format!("CA_ADDR=https://{CP}:15012\nISTHMUS_CA_SERVER_NAME=istiod.istio-system.svc\nISTHMUS_CERT_DIR=/etc/certs\nISTHMUS_JOIN_TOKEN_FILE=/etc/isthmus/token\nISTHMUS_STATE_DIR=/var/lib/isthmus\nISTHMUS_PROXY=true\nISTHMUS_CAPTURE=true\nISTIO_SVC_IP=10.0.0.3\n"),
    );
    write(r, CLUSTER_ENV, CLUSTER);
    write(r, SIDECAR_ENV, "ISTIO_INBOUND_PORTS=3306\n");
    write(r, "/etc/certs/root-cert.pem", &ca.trust_bundle_pem());
    write(
        r,
        "/etc/isthmus/token",
        &token(SystemTime::now() + Duration::from_secs(3600)),
    );
    let h = Host {
        root,
        ca,
        _ca_dir: ca_dir,
    };
    h.issue(Duration::from_secs(24 * 3600));
    h
}

impl Host {
    fn issue(&self, lifetime: Duration) {
        let id: SpiffeId = "spiffe://cluster.local/ns/onprem/sa/mysql".parse().unwrap();
        let kp = self.ca.issue_workload(&id, Some(lifetime)).unwrap();
        write(self.root.path(), "/etc/certs/key.pem", &kp.key_pem);
        let key = under(self.root.path(), Path::new("/etc/certs/key.pem"));
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        write(
            self.root.path(),
            "/etc/certs/cert-chain.pem",
            &kp.chain_pem(),
        );
    }
    fn cfg(&self) -> HostConfig {
        let (r, cfg) = config(self.root.path());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        cfg.unwrap()
    }
    fn opts(&self) -> Options {
        Options {
            root: self.root.path().to_path_buf(),
            timeout: Duration::from_secs(1),
            max_clock_skew: Duration::from_secs(5),
            resolv_conf: self.root.path().join("resolv.conf"),
        }
    }
}

fn dump() -> String {
    json!({"ready": true, "identity": {"spiffeId": "spiffe://cluster.local/ns/onprem/sa/mysql"},
      "discovery": {"status": "Connected", "services": [
        {"hostname": "mysql.onprem.svc.cluster.local", "namespace": "onprem", "vips": ["10.96.0.20"],
         "ports": [{"port": 3306, "targetPort": 3306, "appProtocol": "Unknown"}]},
        {"hostname": "productpage.bookinfo.svc.cluster.local", "namespace": "bookinfo", "vips": [VIP],
         "ports": [{"port": 9080, "targetPort": 9080, "appProtocol": "Http11"}]},
        {"hostname": "empty.bookinfo.svc.cluster.local", "namespace": "bookinfo", "vips": ["10.96.0.30"],
         "ports": [{"port": 80, "targetPort": 80, "appProtocol": "Http11"}]}],
      "workloads": [
        {"addresses": ["10.0.0.3"], "health": "Healthy", "services": ["onprem/mysql.onprem.svc.cluster.local"]},
        {"addresses": ["10.0.0.4"], "health": "Healthy", "services": ["bookinfo/productpage.bookinfo.svc.cluster.local"]}]}})
    .to_string()
}

/// Everything working: the control plane answers with a trusted certificate and the same time,
/// the agent is ready, the rules are installed, DNS goes to the agent, the service answers.
fn good(h: &Host) -> Fake {
    std::fs::write(
        h.root.path().join("resolv.conf"),
        format!("nameserver {CP}\n"),
    )
    .unwrap();
    let now = SystemTime::now();
    let nf = FakeNetfilter::new();
    isthmus_intercept::install(&nf, h.cfg().intercept.as_ref().unwrap()).unwrap();
    let rt = FakeRouting::new();
    isthmus_intercept::install_routes(&rt, h.cfg().intercept.as_ref().unwrap()).unwrap();
    let vip: IpAddr = VIP.parse().unwrap();
    Fake {
        now,
        tls: TlsOutcome::Done {
            verdict: None,
            chain: Vec::new(),
            date: Ok((now - Duration::from_millis(300), now)),
            elapsed: Duration::from_millis(2),
        },
        http: HashMap::from([
            (
                ("127.0.0.1:15021".parse().unwrap(), "/healthz/ready"),
                Ok((200, "ready\n".into())),
            ),
            (
                ("127.0.0.1:15000".parse().unwrap(), "/config_dump"),
                Ok((200, dump())),
            ),
            (
                ("127.0.0.1:15020".parse().unwrap(), "/healthz"),
                Ok((200, "ok\n".into())),
            ),
        ]),
        dns: HashMap::from([
            ("127.0.0.1:15053".parse().unwrap(), Ok(vec![vip])),
            (format!("{CP}:53").parse().unwrap(), Ok(vec![vip])),
        ]),
        dial: Ok(DialOutcome::Http(200)),
        nf,
        rt,
        dialed: Default::default(),
    }
}

async fn report(h: &Host, f: &Fake) -> Report {
    run_checks(f, &h.opts()).await
}

/// The status of every check, in order, and the check named `name`.
fn statuses(r: &Report) -> Vec<(&'static str, Status)> {
    r.checks.iter().map(|c| (c.name, c.status)).collect()
}

fn check<'a>(r: &'a Report, name: &str) -> &'a CheckResult {
    r.checks.iter().find(|c| c.name == name).unwrap()
}

/// All pass but those in `changed`.
fn expect(r: &Report, changed: &[(&str, Status)]) {
    let want: Vec<(&'static str, Status)> = NAMES
        .iter()
        .map(|n| {
            (
                *n,
                changed
                    .iter()
                    .find(|(c, _)| c == n)
                    .map_or(Status::Pass, |(_, s)| *s),
            )
        })
        .collect();
    assert_eq!(statuses(r), want, "{}", r.text());
    for c in &r.checks {
        assert_eq!(c.fix.is_some(), c.status == Status::Fail, "{c:?}");
    }
}

#[tokio::test]
async fn a_good_host_passes_every_check() {
    let h = host();
    let f = good(&h);
    let r = report(&h, &f).await;
    expect(&r, &[]);
    assert_eq!(r.failed, 0);
    let text = r.text();
    assert!(
        text.contains(
            "PASS  certificate    spiffe://cluster.local/ns/onprem/sa/mysql, valid until"
        ),
        "{text}"
    );
    assert!(
        check(&r, "dns").message.starts_with(
            "productpage.bookinfo.svc.cluster.local → 10.96.0.10 through nameserver 10.0.0.2:53"
        ),
        "{text}"
    );
    // The service with a healthy endpoint on another host, over HTTP as its port says.
    assert_eq!(
        *f.dialed.lock().unwrap(),
        vec![(
            format!("{VIP}:9080").parse().unwrap(),
            Some("productpage.bookinfo.svc.cluster.local:9080".to_string())
        )]
    );
    assert!(
        check(&r, "connection").message.contains("HTTP 200"),
        "{text}"
    );
    let v: Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["checks"][0]["status"], "PASS");
    assert_eq!(v["failed"], 0);
}

#[tokio::test]
async fn without_agent_env_config_fails_and_the_rest_is_skipped() {
    let h = host();
    let f = good(&h);
    std::fs::remove_file(under(h.root.path(), Path::new(AGENT_ENV))).unwrap();
    let r = report(&h, &f).await;
    let c = check(&r, "config");
    assert_eq!(c.status, Status::Fail);
    assert!(
        c.message.contains("cannot read env file") && c.message.contains("agent.env"),
        "{c:?}"
    );
    assert!(c.fix.as_ref().unwrap().contains("isthmus join"), "{c:?}");
    assert!(r.checks[1..].iter().all(|c| c.status == Status::Skip));
}

#[test]
fn bad_values_are_named() {
    let h = host();
    write(
        h.root.path(),
        AGENT_ENV,
        "CA_ADDR=10.0.0.2:15012\nISTHMUS_CAPTURE=maybe\n",
    );
    write(
        h.root.path(),
        CLUSTER_ENV,
        "ISTIO_SERVICE_CIDR=10.96.0.0/33\n",
    );
    let (r, cfg) = config(h.root.path());
    assert!(cfg.is_none());
    assert_eq!(r.status, Status::Fail);
    assert!(
        r.message
            .contains("ISTHMUS_CAPTURE=\"maybe\" is not true or false"),
        "{r:?}"
    );
    assert!(
        r.message.contains(
            "CA_ADDR=\"10.0.0.2:15012\" is not a control plane address: expected https://HOST:PORT"
        ),
        "{r:?}"
    );
    assert!(
        r.message.contains("ISTIO_SERVICE_CIDR=\"10.96.0.0/33\""),
        "{r:?}"
    );
    assert_eq!(
        parse_ca_addr("https://[::1]:15012/"),
        Ok(("::1".into(), 15012))
    );
}

#[tokio::test]
async fn an_unreachable_control_plane_fails_and_the_clock_is_skipped() {
    let h = host();
    let mut f = good(&h);
    f.tls = TlsOutcome::Unreachable("connection refused".into());
    let r = report(&h, &f).await;
    expect(
        &r,
        &[("control-plane", Status::Fail), ("clock", Status::Skip)],
    );
    let c = check(&r, "control-plane");
    assert!(
        c.message
            .starts_with("unreachable: cannot connect to 10.0.0.2:15012"),
        "{c:?}"
    );
    assert!(c.fix.as_ref().unwrap().contains("isthmus server"), "{c:?}");
}

#[tokio::test]
async fn a_wrong_root_or_name_is_told_apart_from_unreachable() {
    let h = host();
    let mut f = good(&h);
    let done = |verdict| TlsOutcome::Done {
        verdict: Some(rustls::Error::InvalidCertificate(verdict)),
        chain: Vec::new(),
        date: Ok((SystemTime::now(), SystemTime::now())),
        elapsed: Duration::ZERO,
    };
    f.tls = done(CertificateError::UnknownIssuer);
    let c = control_plane(&f, &h.cfg()).await.result;
    assert!(c.message.starts_with("wrong root: reached 10.0.0.2:15012, but its certificate does not chain to /etc/certs/root-cert.pem"), "{c:?}");
    assert!(c.fix.unwrap().contains("isthmus vm certs"));
    f.tls = done(CertificateError::NotValidForName);
    let c = control_plane(&f, &h.cfg()).await.result;
    assert!(
        c.message
            .contains("does not carry the name \"istiod.istio-system.svc\""),
        "{c:?}"
    );
    assert!(c.fix.unwrap().contains("ISTHMUS_CA_SERVER_NAME"));
}

#[test]
fn clock_skew_above_the_limit_fails() {
    let now = SystemTime::now();
    let at = |server: SystemTime| {
        Some(TlsOutcome::Done {
            verdict: None,
            chain: Vec::new(),
            date: Ok((server, now)),
            elapsed: Duration::ZERO,
        })
    };
    let max = Duration::from_secs(5);
    let c = clock(&at(now - Duration::from_secs(10)), max);
    assert_eq!(c.status, Status::Fail);
    assert!(
        c.message
            .starts_with("this host's clock is 9.5 s ahead of the control plane's"),
        "{c:?}"
    );
    assert!(c.fix.unwrap().contains("timedatectl set-ntp true"));
    let c = clock(&at(now + Duration::from_secs(7)), max);
    assert!(
        c.message.starts_with("this host's clock is 7.5 s behind"),
        "{c:?}"
    );
    assert_eq!(
        clock(&at(now + Duration::from_secs(3)), max).status,
        Status::Pass
    );
    assert_eq!(clock(&None, max).status, Status::Skip);
}

#[tokio::test]
async fn a_certificate_from_another_mesh_fails() {
    let h = host();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::load_or_create(&CaConfig::new(other_dir.path())).unwrap();
    write(
        h.root.path(),
        "/etc/certs/root-cert.pem",
        &other.trust_bundle_pem(),
    );
    let c = certificate(&good(&h), &h.cfg());
    assert_eq!(c.status, Status::Fail);
    assert!(c.message.contains("not valid against /etc/certs/root-cert.pem: it was not issued by a CA in this mesh's trust bundle"), "{c:?}");
    assert!(c.fix.unwrap().contains("isthmus vm certs"));
}

#[tokio::test]
async fn an_expired_or_nearly_expired_certificate_fails() {
    let h = host();
    h.issue(Duration::from_secs(1000));
    let mut f = good(&h);
    f.now = SystemTime::now() + Duration::from_secs(950);
    let c = certificate(&f, &h.cfg());
    assert!(c.message.contains("less than 10% of its"), "{c:?}");
    f.now = SystemTime::now() + Duration::from_secs(500);
    assert_eq!(certificate(&f, &h.cfg()).status, Status::Pass);
    f.now = SystemTime::now() + Duration::from_secs(2000);
    let c = certificate(&f, &h.cfg());
    assert!(c.message.contains("it expired at"), "{c:?}");
    assert!(c.fix.unwrap().contains("isthmus token create"));
}

#[tokio::test]
async fn a_key_of_another_certificate_or_readable_by_others_fails() {
    let h = host();
    let key =
        std::fs::read_to_string(under(h.root.path(), Path::new("/etc/certs/key.pem"))).unwrap();
    h.issue(Duration::from_secs(3600));
    let key_path = under(h.root.path(), Path::new("/etc/certs/key.pem"));
    std::fs::remove_file(&key_path).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let c = certificate(&good(&h), &h.cfg());
    assert!(c.message.contains("key.pem is mode 0644"), "{c:?}");
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let c = certificate(&good(&h), &h.cfg());
    assert_eq!(
        c.message,
        "key.pem does not match the certificate in cert-chain.pem"
    );
}

#[tokio::test]
async fn no_certificate_yet_says_what_the_token_tells() {
    let h = host();
    for f in ["key.pem", "cert-chain.pem"] {
        std::fs::remove_file(under(h.root.path(), Path::new("/etc/certs")).join(f)).unwrap();
    }
    write(
        h.root.path(),
        "/etc/isthmus/token",
        &token(SystemTime::now() - Duration::from_secs(60)),
    );
    let mut f = good(&h);
    f.http.clear();
    let r = report(&h, &f).await;
    expect(
        &r,
        &[
            ("certificate", Status::Fail),
            ("agent", Status::Fail),
            ("rules", Status::Fail),
            ("dns", Status::Skip),
            ("connection", Status::Skip),
        ],
    );
    let c = check(&r, "certificate");
    assert!(
        c.message.contains("no certificate yet")
            && c.message
                .contains("(id tok123, for spiffe://cluster.local/ns/onprem/sa/mysql) expired at"),
        "{c:?}"
    );
    assert!(
        c.fix
            .as_ref()
            .unwrap()
            .contains("isthmus token create -n onprem -s mysql"),
        "{c:?}"
    );
    assert!(check(&r, "agent")
        .message
        .starts_with("not running: nothing answers on 127.0.0.1:15021"));
    // The fix is a command that runs as printed: the agent with agent.env as its environment.
    assert_eq!(
        check(&r, "agent").fix.as_deref().unwrap(),
        format!(
            "start it: `sudo systemctl start isthmus-agent` (without systemd: `sudo sh -c 'set -a; . {}/etc/isthmus/agent.env; exec isthmus agent'`); `journalctl -u isthmus-agent` says why it stopped",
            h.root.path().display()
        )
    );
    // The fake still has the rules: installed but nobody serves them.
    assert!(check(&r, "rules").message.contains("agent is not ready"));

    // A valid token: maybe revoked or used up, which only the control plane knows.
    write(
        h.root.path(),
        "/etc/isthmus/token",
        &token(SystemTime::now() + Duration::from_secs(60)),
    );
    let c = certificate(&f, &h.cfg());
    assert!(c.message.contains("it may be revoked or used up"), "{c:?}");
    assert!(c.fix.unwrap().contains("isthmus token list"));
}

#[tokio::test]
async fn an_agent_without_readiness_is_running_or_not() {
    let h = host();
    let mut f = good(&h);
    f.http.insert(
        ("127.0.0.1:15021".parse().unwrap(), "/healthz/ready"),
        Ok((503, "not ready: waiting\n".into())),
    );
    let a = agent(&f, &h.cfg()).await;
    assert!(!a.ready);
    assert_eq!(
        a.result.message,
        "running but not ready (127.0.0.1:15021/healthz/ready: 503 not ready: waiting)"
    );
    f.http
        .remove(&("127.0.0.1:15021".parse().unwrap(), "/healthz/ready"));
    let a = agent(&f, &h.cfg()).await;
    assert!(
        a.result
            .message
            .starts_with("running (metrics on 127.0.0.1:15020 answer) but no readiness endpoint"),
        "{:?}",
        a.result
    );
}

#[tokio::test]
async fn missing_or_displaced_rules_fail() {
    let h = host();
    let f = good(&h);
    isthmus_intercept::cleanup(&f.nf).unwrap();
    let r = report(&h, &f).await;
    expect(&r, &[("rules", Status::Fail)]);
    let c = check(&r, "rules");
    assert!(
        c.message
            .starts_with("interception rules missing: no chain ISTHMUS_INBOUND (IPv4)"),
        "{c:?}"
    );
    assert!(c.fix.as_ref().unwrap().contains("restart the agent"));

    let f = good(&h);
    f.nf.restore(
        Family::V4,
        "*nat\n:DOCKER - [0:0]\n-I OUTPUT 1 -j DOCKER\nCOMMIT\n",
    )
    .unwrap();
    let c = rules(&f, &h.cfg(), true);
    assert_eq!(c.status, Status::Fail);
    assert!(c.message.contains("nat OUTPUT must start with jumps to ISTHMUS_DNS, ISTHMUS_OUTPUT, its first rule is `-A OUTPUT -j DOCKER`"), "{c:?}");
    // PREROUTING is still right.
    assert!(!c.message.contains("PREROUTING"), "{c:?}");

    // Not captured: nothing to check.
    write(
        h.root.path(),
        AGENT_ENV,
        "CA_ADDR=https://10.0.0.2:15012\nISTHMUS_CAPTURE=false\n",
    );
    let c = rules(&f, &h.cfg(), true);
    assert_eq!(c.status, Status::Skip);
    assert!(c.message.contains("ISTHMUS_CAPTURE is not true"));
}

#[tokio::test]
async fn vip_networks_not_routed_through_lo_fail() {
    let h = host();
    write(
        h.root.path(),
        SIDECAR_ENV,
        "ISTIO_INBOUND_PORTS=3306\nISTHMUS_VIP_CIDR=10.96.0.0/16\n",
    );
    let f = good(&h);
    let c = rules(&f, &h.cfg(), true);
    assert_eq!(c.status, Status::Pass, "{c:?}");
    assert!(
        c.message
            .contains("ISTHMUS_VIP_CIDR 10.96.0.0/16 routed through lo (table 15001)"),
        "{c:?}"
    );

    isthmus_intercept::cleanup_routes(&f.rt).unwrap();
    let c = rules(&f, &h.cfg(), true);
    assert_eq!(c.status, Status::Fail, "{c:?}");
    assert_eq!(
        c.message,
        "ISTHMUS_VIP_CIDR not routed through lo: 10.96.0.0/16 (no route in table 15001); \
         captured connections to it get the outside link's segment size"
    );
    assert!(c.fix.as_ref().unwrap().contains("restart the agent"));
    let c = rules(&f, &h.cfg(), false);
    assert_eq!(c.status, Status::Skip, "{c:?}");

    f.rt.change(&isthmus_intercept::RouteChange::AddRoute(
        "10.96.0.0/16".parse().unwrap(),
    ))
    .unwrap();
    let c = rules(&f, &h.cfg(), true);
    assert!(
        c.message
            .contains("10.96.0.0/16 (no `ip rule` at priority 15001 into table 15001)"),
        "{c:?}"
    );
}

#[tokio::test]
async fn dns_that_misses_the_agent_fails_with_the_capture_fix() {
    let h = host();
    let mut f = good(&h);
    f.dns.remove(&format!("{CP}:53").parse().unwrap());
    // DNS capture off in cluster.env: the fix is to turn it on.
    write(
        h.root.path(),
        CLUSTER_ENV,
        "ISTIO_SERVICE_CIDR=10.96.0.0/12\n",
    );
    let r = report(&h, &f).await;
    expect(&r, &[("rules", Status::Fail), ("dns", Status::Fail)]);
    let c = check(&r, "dns");
    assert!(c.message.starts_with("no nameserver of"), "{c:?}");
    assert!(c.message.contains("10.0.0.2:53: timed out"), "{c:?}");
    assert!(
        c.fix
            .as_ref()
            .unwrap()
            .contains("ISTIO_META_DNS_CAPTURE=true"),
        "{c:?}"
    );

    // Another answer than the agent's.
    f.dns.insert(
        format!("{CP}:53").parse().unwrap(),
        Ok(vec!["10.1.1.1".parse().unwrap()]),
    );
    let c = dns(
        &f,
        &h.cfg(),
        &agent(&f, &h.cfg()).await,
        Some(&pick_service(&serde_json::from_str(&dump()).unwrap(), &h.cfg()).unwrap()),
        &h.opts().resolv_conf,
    )
    .await;
    assert!(c.message.contains("answers productpage.bookinfo.svc.cluster.local with [10.1.1.1], the agent's DNS proxy with 10.96.0.10"), "{c:?}");
    f.dns.insert(
        format!("{CP}:53").parse().unwrap(),
        Err(DnsFailure::Rcode("NXDomain".into())),
    );
    let c = dns(
        &f,
        &h.cfg(),
        &agent(&f, &h.cfg()).await,
        Some(&pick_service(&serde_json::from_str(&dump()).unwrap(), &h.cfg()).unwrap()),
        &h.opts().resolv_conf,
    )
    .await;
    assert!(c.message.contains("with NXDomain"), "{c:?}");
}

#[tokio::test]
async fn dns_to_a_nameserver_without_a_route_names_the_route_not_the_rules() {
    let h = host();
    let mut f = good(&h);
    f.dns.insert(
        format!("{CP}:53").parse().unwrap(),
        Err(DnsFailure::Unanswered(
            "Network is unreachable (os error 101)".into(),
        )),
    );
    let r = report(&h, &f).await;
    let c = check(&r, "dns");
    assert_eq!(c.status, Status::Fail, "{c:?}");
    assert!(
        c.message.contains("10.0.0.2:53: Network is unreachable"),
        "{c:?}"
    );
    let fix = c.fix.as_deref().unwrap();
    assert!(
        fix.starts_with("this host has no route to its nameserver, so queries fail before the capture can redirect them to the agent"),
        "{c:?}"
    );
    assert!(!fix.contains("reinstall"), "{c:?}");
}

#[test]
fn agent_env_problems_come_from_the_one_parser() {
    let h = host();
    write(
        h.root.path(),
        AGENT_ENV,
        "CA_ADDR=https://10.0.0.2:15012\nISTHMUS_CAPTRUE=true\n",
    );
    let (r, cfg) = config(h.root.path());
    assert!(cfg.is_none());
    assert!(
        r.message.contains(
            "ISTHMUS_CAPTRUE is not a setting of the agent (did you mean ISTHMUS_CAPTURE?)"
        ),
        "{r:?}"
    );
    assert_eq!(
        r.fix.as_deref(),
        Some(
            format!(
                "rename ISTHMUS_CAPTRUE to ISTHMUS_CAPTURE in {}",
                under(h.root.path(), Path::new(AGENT_ENV)).display()
            )
            .as_str()
        )
    );
}

#[tokio::test]
async fn a_failed_connection_names_the_service() {
    let h = host();
    let mut f = good(&h);
    f.dial = Err("connected, but the connection was closed without an HTTP answer".into());
    let r = report(&h, &f).await;
    expect(&r, &[("connection", Status::Fail)]);
    let c = check(&r, "connection");
    assert!(
        c.message.starts_with(
            "productpage.bookinfo.svc.cluster.local (10.96.0.10:9080): connected, but"
        ),
        "{c:?}"
    );
    assert!(c
        .fix
        .as_ref()
        .unwrap()
        .contains("isthmus get workloads -n bookinfo"));
    assert!(r.text().contains("FAIL  connection"));
}

#[test]
fn expected_rules_come_from_the_rendered_ones() {
    let cfg = InterceptConfig::from_env(
        &EnvFile::parse("cluster.env", CLUSTER).unwrap(),
        &EnvFile::parse("sidecar.env", "ISTIO_INBOUND_PORTS=3306").unwrap(),
        &[],
    )
    .unwrap();
    let e = expected(&isthmus_intercept::render(&cfg).v4);
    assert_eq!(
        e.first,
        vec![
            (
                "OUTPUT".to_string(),
                vec!["ISTHMUS_DNS".to_string(), "ISTHMUS_OUTPUT".to_string()]
            ),
            (
                "PREROUTING".to_string(),
                vec!["ISTHMUS_INBOUND".to_string()]
            ),
        ]
    );
    // iptables-save spells the rules its own way (-m udp); only the targets and order count.
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTHMUS_DNS - [0:0]\n:ISTHMUS_OUTPUT - [0:0]\n:ISTHMUS_REDIRECT - [0:0]\n:ISTHMUS_INBOUND - [0:0]\n:ISTHMUS_IN_REDIRECT - [0:0]\n-A PREROUTING -p tcp -j ISTHMUS_INBOUND\n-A OUTPUT -p udp -m udp --dport 53 -j ISTHMUS_DNS\n-A OUTPUT -p tcp -j ISTHMUS_OUTPUT\n-A OUTPUT -j DOCKER\nCOMMIT\n";
    assert_eq!(compare(save, &e), (vec![], vec![]));
}

#[test]
fn capture_without_a_service_network_fails_as_the_agent_would() {
    let h = host();
    write(h.root.path(), CLUSTER_ENV, "ISTIO_META_DNS_CAPTURE=true\n");
    let (r, _) = config(h.root.path());
    assert_eq!(r.status, Status::Fail, "{r:?}");
    assert!(r.message.contains("ISTIO_SERVICE_CIDR"), "{r:?}");
    assert!(r.message.contains("ISTIO_SERVICE_CIDR=*"), "{r:?}");
    assert_eq!(
        r.fix.as_deref(),
        Some(format!("set ISTIO_SERVICE_CIDR in {CLUSTER_ENV}").as_str())
    );
}
