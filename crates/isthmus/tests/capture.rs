//! The agent never captures its own traffic (issue 13, part 1). In network namespaces (root
//! only; they say so loudly when skipped): an agent capturing every destination
//! (`ISTIO_SERVICE_CIDR=*`) as uid 0 and as an unprivileged uid other than 1337 reaches the
//! control plane, gets ready and carries a mesh connection with no loop (its descriptors and its
//! log stay small); and SIGTERM while the agent is out of descriptors still removes its rules.
//! Without root: `--capture` with no `cluster.env` or no `ISTIO_SERVICE_CIDR` refuses to start
//! and names the file and the variable.

mod common;
#[path = "common/lab.rs"]
mod lab;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_for, BIN};
use lab::Lab;

const CP: &str = "10.78.0.1";
const VM: &str = "10.78.0.2";
/// An unprivileged user that is not Istio's 1337.
const UID: u32 = 4242;

fn root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn skip(test: &str) -> bool {
    if root() {
        return false;
    }
    eprintln!("!!!! SKIP {test}: needs root (network namespaces, iptables) !!!!");
    true
}

/// A control plane on `cp`, the VM's files (certs, token for onprem/mysql) under `dir`, and
/// the VM's "mysql" (an HTTP server on 3306) registered as a mesh service.
struct World {
    lab: Lab,
    admin: String,
    token: String,
    vm_dir: PathBuf,
}

impl World {
    fn new(prefix: &str, dir: &Path) -> World {
        let mut lab = Lab::new(prefix, &[("cp", CP), ("vm", VM)], CP);
        let cp_dir = dir.join("cp");
        let args = lab::control_plane_args(&cp_dir, CP, &[]);
        lab.spawn(
            "cp",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[("ISTHMUS_LOG", "warn")],
        );
        let ep = wait_json(&cp_dir.join("endpoints.json"));
        let admin = ep["admin"].as_str().unwrap().to_string();
        let token = std::fs::read_to_string(cp_dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        let mut w = World {
            lab,
            admin,
            token,
            vm_dir: dir.join("vm"),
        };
        std::fs::create_dir_all(&w.vm_dir).unwrap();
        let certs = w.vm_dir.join("certs");
        w.cli(&["vm", "certs", "-o", certs.to_str().unwrap()]);
        let join = w.cli(&["token", "create", "-n", "onprem", "-s", "mysql"]);
        std::fs::write(w.vm_dir.join("token"), join).unwrap();
        w.cli(&[
            "register", "mysql", VM, "3306", "-n", "onprem", "-s", "mysql",
        ]);
        w.lab.spawn(
            "vm",
            &["python3", "-m", "http.server", "3306", "--bind", VM],
            &[],
        );
        w
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self
            .lab
            .command("cp", &[BIN])
            .args(args)
            .env("ISTHMUS_SERVER", &self.admin)
            .env("ISTHMUS_TOKEN", &self.token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "isthmus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `isthmus agent --proxy --capture` on the VM, capturing every destination, through
    /// `wrap` (e.g. `setpriv ...`), its log in `<vm>/agent.log`.
    fn start_agent(&self, wrap: &[&str], extra: &[&str]) -> Child {
        let d = &self.vm_dir;
        std::fs::write(d.join("cluster.env"), "ISTIO_SERVICE_CIDR=*\n").unwrap();
        std::fs::write(d.join("sidecar.env"), "").unwrap();
        let state = d.join("state");
        let _ = std::fs::remove_file(state.join("agent-endpoints.json"));
        let p = |f: &str| d.join(f).display().to_string();
        let mut args: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                BIN,
                "agent",
                "--ca-addr",
                &format!("https://{CP}:15012"),
                "--ip",
                VM,
                "--proxy",
                "--capture",
                "--metrics-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
                "--dns-upstream",
                &format!("{CP}:15054"),
                "--drain-duration",
                "1s",
                "--cert-dir",
                &p("certs"),
                "--state-dir",
                &p("state"),
                "--join-token-file",
                &p("token"),
                "--cluster-env",
                &p("cluster.env"),
                "--sidecar-env",
                &p("sidecar.env"),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = std::fs::File::create(d.join("agent.log")).unwrap();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.lab.command("vm", &refs);
        cmd.env("ISTHMUS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        cmd.spawn().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.vm_dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits for the agent's readiness endpoint; fails with its log if it exits first.
    fn wait_ready(&self, agent: &mut Child) {
        let ep = wait_for("agent-endpoints.json", Duration::from_secs(30), || {
            if let Ok(Some(st)) = agent.try_wait() {
                panic!("agent exited early with {st}:\n{}", self.log());
            }
            let path = self.vm_dir.join("state/agent-endpoints.json");
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).ok()?).ok()
        });
        let url = format!("{}/healthz/ready", ep["readiness"].as_str().unwrap());
        wait_for("the agent ready", Duration::from_secs(30), || {
            if let Ok(Some(st)) = agent.try_wait() {
                panic!("agent exited with {st}:\n{}", self.log());
            }
            let out = self
                .lab
                .exec("vm", &["curl", "-sf", "--max-time", "2", &url]);
            out.status.success().then_some(())
        });
    }

    /// The VM's app calling the mesh service by its VIP: captured on 15001, tunnelled over
    /// HBONE (to this very host), handed to the app on 3306.
    fn mesh_call(&self) -> bool {
        let dump = self.cli(&["get", "services", "-n", "onprem", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let Some(vip) = v["items"][0]["status"]["vip"].as_str() else {
            return false;
        };
        let out = self.lab.exec(
            "vm",
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                &format!("http://{vip}:3306/"),
            ],
        );
        String::from_utf8_lossy(&out.stdout) == "200"
    }

    fn nat_rules(&self) -> String {
        let out = self.lab.exec("vm", &["iptables-save", "-t", "nat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn wait_json(path: &Path) -> serde_json::Value {
    wait_for(&path.display().to_string(), Duration::from_secs(30), || {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn term(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("the agent to stop", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    })
}

/// Captures everything as the user `wrap` runs it as, and checks there is no loop.
fn capture_everything(prefix: &str, wrap: &[&str], chown: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let w = World::new(prefix, dir.path());
    if let Some(id) = chown {
        let out = Command::new("chown")
            .args(["-R", &format!("{id}:{id}")])
            .arg(&w.vm_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let mut agent = w.start_agent(wrap, &[]);
    w.wait_ready(&mut agent);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap();
    let uid = chown.unwrap_or(0).to_string();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some(&uid)),
        "the agent runs as uid {uid}:\n{status}"
    );
    assert!(
        w.log().contains("exempt_by=\"mark\""),
        "exempt by its mark, not by uid 1337:\n{}",
        w.log()
    );
    let rules = w.nat_rules();
    assert!(
        rules.contains("-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT")
            && rules.contains("-m mark --mark 0x539 -j RETURN"),
        "captures everything, the agent's mark exempt:\n{rules}"
    );
    wait_for(
        "a mesh call from the VM through the capture",
        Duration::from_secs(30),
        || w.mesh_call().then_some(()),
    );
    for i in 0..20 {
        assert!(w.mesh_call(), "mesh call {i}");
    }
    // No loop: a handful of descriptors and a short log, after a few seconds of running.
    std::thread::sleep(Duration::from_secs(2));
    let fds = open_fds(agent.id());
    let log = w.log();
    assert!(fds < 200, "the agent holds {fds} descriptors:\n{log}");
    assert!(log.len() < 64 * 1024, "{} bytes of log:\n{log}", log.len());
    // A few warnings while the app starts (its port not open yet), no more.
    let warnings = log.matches("WARN").count();
    assert!(warnings <= 10, "{warnings} warnings:\n{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(
        !log.contains("the connection comes from the agent itself"),
        "nothing looped:\n{log}"
    );
    eprintln!(
        "capture of everything: {fds} descriptors, {} bytes of log, {warnings} warnings",
        log.len()
    );
    let status = term(&mut agent);
    assert!(status.success(), "agent exit {status}:\n{}", w.log());
    assert!(
        !w.nat_rules().contains("ISTHMUS"),
        "rules removed at stop:\n{}",
        w.nat_rules()
    );
}

#[test]
fn capture_everything_as_root_without_a_loop_netns() {
    if skip("capture_everything_as_root_without_a_loop_netns") {
        return;
    }
    capture_everything("c0", &[], None);
}

#[test]
fn capture_everything_as_an_unprivileged_user_without_a_loop_netns() {
    if skip("capture_everything_as_an_unprivileged_user_without_a_loop_netns") {
        return;
    }
    let id = UID.to_string();
    capture_everything(
        "cu",
        &[
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--inh-caps",
            "+net_admin,+net_raw",
            "--ambient-caps",
            "+net_admin,+net_raw",
        ],
        Some(UID),
    );
}

#[test]
fn sigterm_out_of_descriptors_still_removes_the_rules_netns() {
    if skip("sigterm_out_of_descriptors_still_removes_the_rules_netns") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new("cf", dir.path());
    // An upstream that completes handshakes in its backlog and never reads: every captured
    // connection to it holds two of the agent's descriptors.
    w.lab.spawn(
        "cp",
        &[
            "python3",
            "-c",
            &format!(
                "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('{CP}',7777))\ns.listen(4096)\ntime.sleep(600)\n"
            ),
        ],
        &[],
    );
    // A hard limit of 256 the agent cannot raise, and no bound of its own on connections, so
    // the descriptors do run out.
    let mut agent = w.start_agent(
        &["sh", "-c", "ulimit -n 256 && exec \"$@\"", "sh"],
        &["--max-connections", "100000"],
    );
    w.wait_ready(&mut agent);
    assert!(w.nat_rules().contains("ISTHMUS_OUTPUT"));
    let mut clients = w.lab.start(
        "vm",
        &[
            "python3",
            "-c",
            &format!(
                "import socket,time\ncs=[]\nfor i in range(600):\n    c=socket.socket()\n    c.setblocking(False)\n    \
                 c.connect_ex(('{CP}',7777))\n    cs.append(c)\ntime.sleep(600)\n"
            ),
        ],
        &[],
    );
    let pid = agent.id();
    wait_for(
        "the agent out of descriptors",
        Duration::from_secs(30),
        || (open_fds(pid) >= 250).then_some(()),
    );
    // Let the accept loop hit EMFILE for a while: it backs off, and logs little.
    std::thread::sleep(Duration::from_secs(3));
    let fds = open_fds(pid);
    let status = term(&mut agent);
    let _ = clients.kill();
    let _ = clients.wait();
    let log = w.log();
    let rules = w.nat_rules();
    assert!(
        !rules.contains("ISTHMUS"),
        "the rules outlived the agent:\n{rules}\n{log}"
    );
    assert!(log.contains("interception rules removed"), "{log}");
    assert!(
        log.contains("Too many open files"),
        "it did run out:\n{log}"
    );
    assert!(status.success(), "agent exit {status}:\n{log}");
    assert!(
        log.len() < 64 * 1024,
        "{} bytes of log out of descriptors:\n{log}",
        log.len()
    );
    eprintln!(
        "out of descriptors: {fds} open at SIGTERM, {} bytes of log, {} warnings; rules removed \
         ({})",
        log.len(),
        log.matches("WARN").count(),
        if log.contains("retrying") {
            "after closing the connections"
        } else {
            "at the first try"
        }
    );
}

/// Without root: the check comes before any socket or rule.
#[test]
fn capture_without_service_cidr_refuses_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.env");
    let run = || {
        Command::new(BIN)
            .args([
                "agent",
                "--ca-addr",
                "https://127.0.0.1:1",
                "--proxy",
                "--capture",
            ])
            .arg("--cluster-env")
            .arg(&cluster)
            .arg("--sidecar-env")
            .arg(dir.path().join("sidecar.env"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--cert-dir")
            .arg(dir.path().join("certs"))
            .env("ISTHMUS_LOG", "warn")
            .output()
            .unwrap()
    };
    let p = cluster.display();
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "refusing to capture: {p} does not exist, so nothing sets ISTIO_SERVICE_CIDR"
        )) && err.contains(&format!(
            "set ISTIO_SERVICE_CIDR=10.96.0.0/12 (your service network) in {p}, or \
             ISTIO_SERVICE_CIDR=* to capture every destination"
        )),
        "{err}"
    );
    std::fs::write(&cluster, "ISTIO_META_DNS_CAPTURE=true\n").unwrap();
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "refusing to capture: {p} does not set ISTIO_SERVICE_CIDR"
        )),
        "{err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "refused before anything"
    );
}
