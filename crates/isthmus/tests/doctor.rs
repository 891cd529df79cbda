//! `isthmus doctor` on a member host, in network namespaces (root only): a control plane, a
//! mesh host serving `productpage`, and a "VM" whose files live under a `--root` directory and
//! whose agent runs with `--capture`. A good setup passes every check; each broken one fails
//! its own check(s) with the fix, and every other check keeps its status.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, BIN};
use lab::Lab;

const CP: &str = "10.77.0.1";
const MESH: &str = "10.77.0.2";
const VM: &str = "10.77.0.3";
const CHECKS: [&str; 8] = [
    "config",
    "control-plane",
    "clock",
    "certificate",
    "agent",
    "rules",
    "dns",
    "connection",
];

struct Doctor {
    code: i32,
    checks: BTreeMap<String, (String, String, Option<String>)>,
    stdout: String,
}

impl Doctor {
    fn status(&self, name: &str) -> &str {
        &self.checks[name].0
    }
    fn message(&self, name: &str) -> &str {
        &self.checks[name].1
    }
    fn fix(&self, name: &str) -> &str {
        self.checks[name].2.as_deref().unwrap_or("")
    }
    /// Every check's status: PASS but those named in `changed`.
    fn expect(&self, changed: &[(&str, &str)]) {
        let want: Vec<(&str, &str)> = CHECKS
            .iter()
            .map(|n| {
                let s = changed.iter().find(|(c, _)| c == n).map_or("PASS", |c| c.1);
                (*n, s)
            })
            .collect();
        let got: Vec<(&str, &str)> = CHECKS.iter().map(|n| (*n, self.status(n))).collect();
        assert_eq!(got, want, "{}", self.stdout);
        let failed = want.iter().any(|(_, s)| *s == "FAIL");
        assert_eq!(
            self.code != 0,
            failed,
            "exit code {}: {}",
            self.code,
            self.stdout
        );
        for (name, (status, _, fix)) in &self.checks {
            assert_eq!(fix.is_some(), status == "FAIL", "{name}: {}", self.stdout);
        }
    }
}

struct Vm {
    root: PathBuf,
    agent: Option<Child>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = &mut self.agent {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Vm {
    fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }
}

fn doctor(lab: &Lab, vm: &Vm) -> Doctor {
    let out = lab.exec(
        "vm",
        &[
            BIN,
            "doctor",
            "--root",
            vm.root.to_str().unwrap(),
            "-o",
            "json",
            "--timeout",
            "2s",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    // Shown with the test's output on failure (or with --no-capture).
    eprintln!("isthmus doctor: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "doctor -o json: {e}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    c["status"].as_str().unwrap().to_string(),
                    c["message"].as_str().unwrap().to_string(),
                    c["fix"].as_str().map(str::to_string),
                ),
            )
        })
        .collect();
    Doctor {
        code: out.status.code().unwrap_or(-1),
        checks,
        stdout,
    }
}

/// Runs doctor until `f` accepts the report (the agent catches up asynchronously).
fn doctor_until(lab: &Lab, vm: &Vm, what: &str, f: impl Fn(&Doctor) -> bool) -> Doctor {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let d = doctor(lab, vm);
        if f(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            d.stdout
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_file_json(path: &Path) -> serde_json::Value {
    wait_for(&path.display().to_string(), Duration::from_secs(30), || {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    })
}

/// The VM's agent as its systemd unit would run it (agent.env as the environment), with the
/// host paths moved under the root.
fn start_vm_agent(lab: &Lab, vm: &mut Vm) {
    let env = std::fs::read_to_string(vm.path("/etc/isthmus/agent.env")).unwrap();
    let vars: Vec<(String, String)> = env
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect();
    let p = |h: &str| vm.path(h).display().to_string();
    let args = [
        BIN.to_string(),
        "agent".into(),
        "--proxy".into(),
        "--capture".into(),
        "--ip".into(),
        VM.into(),
        "--cert-dir".into(),
        p("/etc/certs"),
        "--root-cert".into(),
        p("/etc/certs/root-cert.pem"),
        "--join-token-file".into(),
        p("/etc/isthmus/token"),
        "--state-dir".into(),
        p("/var/lib/isthmus"),
        "--cluster-env".into(),
        p("/var/lib/istio/envoy/cluster.env"),
        "--sidecar-env".into(),
        p("/var/lib/istio/envoy/sidecar.env"),
        // Names outside the mesh go nowhere (nothing leaves the namespaces).
        "--dns-upstream".into(),
        "127.0.0.1:9".into(),
    ];
    let mut cmd = lab.command("vm", &args.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.envs(vars)
        .env("ISTHMUS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    vm.agent = Some(cmd.spawn().unwrap());
}

/// SIGTERM, as systemd stops it: the agent removes its rules.
fn stop_vm_agent(vm: &mut Vm) {
    if let Some(mut c) = vm.agent.take() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let _ = c.wait();
    }
}

fn set_cluster_env(vm: &Vm, dns_capture: bool) {
    let p = vm.path("/var/lib/istio/envoy/cluster.env");
    let text = std::fs::read_to_string(&p).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("ISTIO_META_DNS_CAPTURE="))
        .map(str::to_string)
        .collect();
    lines.push(format!("ISTIO_META_DNS_CAPTURE={dns_capture}"));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
}

#[test]
fn doctor_on_a_member_host() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "!!!! SKIP doctor_on_a_member_host: needs root (network namespaces, iptables) !!!!"
        );
        return;
    }
    let mut lab = Lab::new("d", &[("cp", CP), ("mesh", MESH), ("vm", VM)], CP);
    let work = tempfile::tempdir().unwrap();
    let cp_dir = work.path().join("cp");
    let cp_args = lab::control_plane_args(&cp_dir, CP, &[]);
    // The first child: removed and killed in step 6.
    lab.spawn(
        "cp",
        &cp_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("ISTHMUS_LOG", "warn")],
    );
    let ep = wait_file_json(&cp_dir.join("endpoints.json"));
    let admin = ep["admin"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(cp_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let cli = |lab: &Lab, args: &[&str], stdin: Option<&str>| -> std::process::Output {
        let mut cmd = lab.command("cp", &[BIN]);
        cmd.args(args)
            .env("ISTHMUS_SERVER", &admin)
            .env("ISTHMUS_TOKEN", &token);
        common::output_with_stdin(cmd, stdin)
    };
    let ok = |lab: &Lab, args: &[&str], stdin: Option<&str>| -> String {
        let out = cli(lab, args, stdin);
        assert!(
            out.status.success(),
            "isthmus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // The mesh: productpage (HTTP) served by the mesh host, a member of its group.
    ok(&lab, &["apply", "-f", "-"], Some(
        "apiVersion: v1\nkind: Service\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  selector: {app: productpage}\n  ports: [{name: http, port: 9080, protocol: HTTP}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  metadata: {labels: {app: productpage}}\n  template: {serviceAccount: productpage, ports: {http: 9080}}\n",
    ));
    let mesh_dir = work.path().join("mesh");
    std::fs::create_dir_all(&mesh_dir).unwrap();
    ok(
        &lab,
        &[
            "vm",
            "certs",
            "-o",
            mesh_dir.join("certs").to_str().unwrap(),
        ],
        None,
    );
    let mesh_token = ok(
        &lab,
        &["token", "create", "-n", "bookinfo", "-s", "productpage"],
        None,
    );
    std::fs::write(mesh_dir.join("token"), mesh_token.trim()).unwrap();
    std::fs::write(
        mesh_dir.join("cluster.env"),
        "ISTIO_SERVICE_CIDR=10.96.0.0/12\n",
    )
    .unwrap();
    std::fs::write(mesh_dir.join("sidecar.env"), "ISTIO_INBOUND_PORTS=9080\n").unwrap();
    lab.spawn(
        "mesh",
        &["python3", "-m", "http.server", "9080", "--bind", MESH],
        &[],
    );
    let md = |f: &str| mesh_dir.join(f).display().to_string();
    let mesh_args = [
        BIN.to_string(),
        "agent".into(),
        "--ca-addr".into(),
        format!("https://{CP}:15012"),
        "--ip".into(),
        MESH.into(),
        "--proxy".into(),
        "--capture".into(),
        "--group".into(),
        "productpage".into(),
        "--cert-dir".into(),
        md("certs"),
        "--state-dir".into(),
        md("state"),
        "--join-token-file".into(),
        md("token"),
        "--cluster-env".into(),
        md("cluster.env"),
        "--sidecar-env".into(),
        md("sidecar.env"),
        "--dns-upstream".into(),
        "127.0.0.1:9".into(),
    ];
    lab.spawn(
        "mesh",
        &mesh_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("ISTHMUS_LOG", "warn")],
    );

    // The VM's files under a root: `isthmus vm config` on the control plane, `isthmus join
    // --root --no-start` on the VM.
    let bundle = work.path().join("vm-bundle");
    let root = work.path().join("vmroot");
    std::fs::create_dir_all(&root).unwrap();
    ok(
        &lab,
        &[
            "vm",
            "config",
            "-n",
            "onprem",
            "-s",
            "mysql",
            "-o",
            bundle.to_str().unwrap(),
            "--control-plane",
            CP,
            "--inbound-ports",
            "3306",
            "--ip",
            VM,
        ],
        None,
    );
    let join = lab.exec(
        "vm",
        &[
            BIN,
            "join",
            bundle.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--no-start",
        ],
    );
    assert!(
        join.status.success(),
        "isthmus join: {}{}",
        String::from_utf8_lossy(&join.stdout),
        String::from_utf8_lossy(&join.stderr)
    );
    let mut vm = Vm { root, agent: None };
    // The seeds' DNS capture, so the host's resolver path leads to the agent.
    set_cluster_env(&vm, true);
    lab.spawn(
        "vm",
        &["python3", "-m", "http.server", "3306", "--bind", VM],
        &[],
    );
    start_vm_agent(&lab, &mut vm);

    // 1. All good (once the VM's agent has the mesh host's healthy endpoint).
    // The connection check passes on any HTTP answer through the capture; the app (a Python
    // server started with the mesh agent) may answer 503 through the mesh until it listens.
    let d = doctor_until(
        &lab,
        &vm,
        "every check to pass with the app answering",
        |d| {
            d.code == 0
                && d.message("connection")
                    .ends_with("HTTP 200 through the capture")
        },
    );
    d.expect(&[]);
    assert!(
        d.message("certificate")
            .starts_with("spiffe://cluster.local/ns/onprem/sa/mysql, valid until"),
        "{}",
        d.stdout
    );
    assert!(
        d.message("connection")
            .starts_with("productpage.bookinfo.svc.cluster.local (10.9"),
        "{}",
        d.stdout
    );
    assert!(
        d.message("connection")
            .ends_with("HTTP 200 through the capture"),
        "{}",
        d.stdout
    );
    assert!(
        d.message("dns")
            .contains(&format!("through nameserver {CP}:53")),
        "{}",
        d.stdout
    );
    assert!(d.message("clock").starts_with("within"), "{}", d.stdout);
    // The text form: one line per check.
    let text = lab.exec("vm", &[BIN, "doctor", "--root", vm.root.to_str().unwrap()]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(text.lines().all(|l| l.starts_with("PASS  ")), "{text}");

    // 2. Rules removed behind the agent's back: rules fail; without them neither the host's
    // DNS nor the VIP reaches the agent, so those fail too; the rest keep passing.
    ok_in(&lab, "vm", &[BIN, "iptables", "--cleanup"]);
    let d = doctor(&lab, &vm);
    d.expect(&[("rules", "FAIL"), ("dns", "FAIL"), ("connection", "FAIL")]);
    assert!(
        d.message("rules")
            .starts_with("interception rules missing: no chain ISTHMUS_INBOUND"),
        "{}",
        d.stdout
    );
    assert!(
        d.fix("rules").starts_with("restart the agent"),
        "{}",
        d.stdout
    );
    stop_vm_agent(&mut vm);
    start_vm_agent(&lab, &mut vm);
    doctor_until(&lab, &vm, "good again after the restart", |d| d.code == 0).expect(&[]);

    // 3. DNS capture off: the host's resolver asks the control plane's address, where no DNS
    // server listens.
    stop_vm_agent(&mut vm);
    set_cluster_env(&vm, false);
    start_vm_agent(&lab, &mut vm);
    let d = doctor_until(&lab, &vm, "the agent back without DNS capture", |d| {
        d.status("agent") == "PASS" && d.status("connection") == "PASS"
    });
    d.expect(&[("dns", "FAIL")]);
    assert!(
        d.message("dns").contains(&format!("{CP}:53")),
        "{}",
        d.stdout
    );
    assert!(
        d.fix("dns").contains("ISTIO_META_DNS_CAPTURE=true"),
        "{}",
        d.stdout
    );
    stop_vm_agent(&mut vm);
    set_cluster_env(&vm, true);
    start_vm_agent(&lab, &mut vm);
    doctor_until(&lab, &vm, "good again with DNS capture", |d| d.code == 0).expect(&[]);

    // 4. A root-cert.pem of another mesh: the control plane is reached but not trusted, and the
    // host's certificate does not verify against it.
    let root_pem = vm.path("/etc/certs/root-cert.pem");
    let good_root = std::fs::read(&root_pem).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_ca =
        isthmus_ca::Ca::load_or_create(&isthmus_ca::CaConfig::new(other.path())).unwrap();
    std::fs::write(&root_pem, other_ca.trust_bundle_pem()).unwrap();
    let d = doctor(&lab, &vm);
    d.expect(&[("control-plane", "FAIL"), ("certificate", "FAIL")]);
    assert!(
        d.message("control-plane").starts_with(&format!(
            "wrong root: reached {CP}:15012, but its certificate does not chain to /etc/certs/root-cert.pem"
        )),
        "{}",
        d.stdout
    );
    assert!(
        d.fix("control-plane").contains("isthmus vm certs"),
        "{}",
        d.stdout
    );
    assert!(
        d.message("certificate")
            .contains("not issued by a CA in this mesh's trust bundle"),
        "{}",
        d.stdout
    );
    std::fs::write(&root_pem, &good_root).unwrap();
    doctor(&lab, &vm).expect(&[]);

    // 5. No certificate yet and an expired join token: the agent gives up; the certificate
    // check says why, the agent is not running, the checks that need it are skipped.
    stop_vm_agent(&mut vm);
    for f in ["key.pem", "cert-chain.pem"] {
        std::fs::remove_file(vm.path("/etc/certs").join(f)).unwrap();
    }
    let expiring = ok(
        &lab,
        &[
            "token", "create", "-n", "onprem", "-s", "mysql", "--ttl", "1s",
        ],
        None,
    );
    std::fs::write(vm.path("/etc/isthmus/token"), expiring.trim()).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    start_vm_agent(&lab, &mut vm);
    wait_for("the agent to give up", Duration::from_secs(30), || {
        vm.agent.as_mut().unwrap().try_wait().unwrap()
    });
    vm.agent = None;
    let d = doctor(&lab, &vm);
    d.expect(&[
        ("certificate", "FAIL"),
        ("agent", "FAIL"),
        ("rules", "SKIP"),
        ("dns", "SKIP"),
        ("connection", "SKIP"),
    ]);
    assert!(
        d.message("certificate").contains("no certificate yet")
            && d.message("certificate").contains("expired at"),
        "{}",
        d.stdout
    );
    assert!(
        d.fix("certificate")
            .contains("isthmus token create -n onprem -s mysql"),
        "{}",
        d.stdout
    );
    assert!(
        d.message("agent").starts_with("not running"),
        "{}",
        d.stdout
    );

    // The same with a revoked token, which only the control plane knows about.
    let created: serde_json::Value = serde_json::from_str(&ok(
        &lab,
        &[
            "token", "create", "-n", "onprem", "-s", "mysql", "-o", "json",
        ],
        None,
    ))
    .unwrap();
    ok(
        &lab,
        &["token", "revoke", created["id"].as_str().unwrap()],
        None,
    );
    std::fs::write(
        vm.path("/etc/isthmus/token"),
        created["token"].as_str().unwrap(),
    )
    .unwrap();
    start_vm_agent(&lab, &mut vm);
    wait_for("the agent to give up", Duration::from_secs(30), || {
        vm.agent.as_mut().unwrap().try_wait().unwrap()
    });
    vm.agent = None;
    let d = doctor(&lab, &vm);
    d.expect(&[
        ("certificate", "FAIL"),
        ("agent", "FAIL"),
        ("rules", "SKIP"),
        ("dns", "SKIP"),
        ("connection", "SKIP"),
    ]);
    assert!(
        d.message("certificate")
            .contains("may be revoked or used up"),
        "{}",
        d.stdout
    );
    assert!(
        d.fix("certificate").contains("isthmus token list"),
        "{}",
        d.stdout
    );

    // A good token again.
    let fresh = ok(
        &lab,
        &["token", "create", "-n", "onprem", "-s", "mysql"],
        None,
    );
    std::fs::write(vm.path("/etc/isthmus/token"), fresh.trim()).unwrap();
    start_vm_agent(&lab, &mut vm);
    doctor_until(&lab, &vm, "good again with a new token", |d| d.code == 0).expect(&[]);

    // 6. The control plane goes away: unreachable, the clock cannot be compared; the host
    // keeps working from its certificate and last good state.
    let mut cp = lab.children.remove(0);
    let _ = cp.kill();
    let _ = cp.wait();
    let d = doctor(&lab, &vm);
    d.expect(&[("control-plane", "FAIL"), ("clock", "SKIP")]);
    assert!(
        d.message("control-plane")
            .starts_with(&format!("unreachable: cannot connect to {CP}:15012")),
        "{}",
        d.stdout
    );
    assert!(
        d.fix("control-plane").contains("isthmus server"),
        "{}",
        d.stdout
    );
    stop_vm_agent(&mut vm);
}

fn ok_in(lab: &Lab, host: &str, args: &[&str]) {
    let out = lab.exec(host, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
