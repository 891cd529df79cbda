//! Test harness: runs the real `isthmus` binary as a server and as the CLI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_isthmus");

/// Every listener of `isthmus server` but the gRPC one on a free loopback port.
pub const ANY_PORTS_BUT_GRPC: [&str; 8] = [
    "--admin-addr",
    "127.0.0.1:0",
    "--registration-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
    "--dns-addr",
    "127.0.0.1:0",
];

/// Every listener of `isthmus server` on a free loopback port.
pub const ANY_PORTS: [&str; 10] = [
    "--admin-addr",
    "127.0.0.1:0",
    "--registration-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
    "--dns-addr",
    "127.0.0.1:0",
    "--grpc-addr",
    "127.0.0.1:0",
];

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub admin: String,
    pub registration: String,
    pub metrics: String,
    /// Certificate API (gRPC over TLS), `https://127.0.0.1:PORT`.
    pub grpc: String,
    /// Mesh DNS, `127.0.0.1:PORT`.
    pub dns: String,
    pub token: String,
    /// Isolates the CLI's config file from the user's.
    pub home: tempfile::TempDir,
}

/// A free loopback port for a server that must keep its address across restarts: picked below
/// Linux's ephemeral range (32768-60999), so no client socket of a parallel test takes it
/// while the server is down.
pub fn stable_port() -> u16 {
    loop {
        let port = 20000 + (rand::random::<u16>() % 12000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    pub fn start(dir: &Path) -> Server {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["--grpc-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Self::start_with_grpc(dir, &args)
    }

    /// Like `start_with`, but `extra` must say `--grpc-addr` itself.
    pub fn start_with_grpc(dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--data-dir"])
            .arg(dir)
            .args(ANY_PORTS_BUT_GRPC)
            .args(extra);
        Self::start_command(cmd, dir)
    }

    /// Starts `cmd` (an `isthmus server ... --data-dir dir ...` command line, perhaps behind a
    /// wrapper such as `prlimit`) and waits for its endpoints.
    pub fn start_command(mut cmd: Command, dir: &Path) -> Server {
        // The server records itself for the CLI under the config dir: the test's, not the user's.
        let home = tempfile::tempdir().unwrap();
        cmd.env(
            "ISTHMUS_LOG",
            std::env::var("TEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("ISTHMUS_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let pid = child.id();
        let endpoints = dir.join("endpoints.json");
        // endpoints.json may be left from an earlier run: wait for the one with our pid.
        let ep: serde_json::Value = wait_for("endpoints.json", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited early with {status}");
            }
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&endpoints).ok()?).ok()?;
            (v["pid"].as_u64() == Some(u64::from(pid))).then_some(v)
        });
        let token = std::fs::read_to_string(dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        Server {
            child,
            dir: dir.to_path_buf(),
            admin: ep["admin"].as_str().unwrap().into(),
            registration: ep["registration"].as_str().unwrap().into(),
            metrics: ep["metrics"].as_str().unwrap().into(),
            grpc: ep["grpc"].as_str().unwrap().into(),
            dns: ep["dns"].as_str().unwrap().into(),
            token,
            home,
        }
    }

    /// Runs the CLI against this server (through the environment, as a user would).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("ISTHMUS_SERVER", &self.admin)
            .env("ISTHMUS_TOKEN", &self.token)
            .env("XDG_CONFIG_HOME", self.home.path())
            .env_remove("ISTHMUS_CONFIG");
        output_with_stdin(cmd, stdin)
    }

    /// Runs the CLI and returns stdout, failing the test if it did not succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "isthmus {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "isthmus {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    pub fn kill9(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = self.child.wait();
    }

    pub fn term(&mut self) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop within 20s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion with `stdin` (or nothing) as its input, capturing its output.
pub fn output_with_stdin(mut cmd: Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// `isthmus agent` for a host whose files live under one directory (`certs/`, `token`,
/// `state/`), every listener on a free loopback port; killed on drop.
pub struct Agent {
    pub child: Child,
    /// What the agent wrote to `state/agent-endpoints.json` (its listeners' addresses).
    pub endpoints: serde_json::Value,
}

impl Agent {
    /// Starts the agent as host IP 127.0.0.9 and waits for its endpoints file. A loopback
    /// address, so the agent's discovery connection comes from the IP its node id claims, as
    /// on a real host (the control plane believes no other claim).
    pub fn start(ca_addr: &str, host: &Path, extra: &[&str]) -> Agent {
        let state = host.join("state");
        let _ = std::fs::remove_file(state.join("agent-endpoints.json"));
        let mut child = Command::new(BIN)
            .args(["agent", "--ca-addr", ca_addr, "--ip", "127.0.0.9"])
            .arg("--cert-dir")
            .arg(host.join("certs"))
            .arg("--join-token-file")
            .arg(host.join("token"))
            .arg("--state-dir")
            .arg(&state)
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
            ])
            .args(["--dns-addr", "127.0.0.1:0", "--dns-upstream", "127.0.0.1:9"])
            .args(extra)
            .env(
                "ISTHMUS_LOG",
                std::env::var("TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let pid = child.id();
        let endpoints = wait_for("agent-endpoints.json", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("agent exited early with {st}");
            }
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(state.join("agent-endpoints.json")).ok()?)
                    .ok()?;
            (v["pid"].as_u64() == Some(u64::from(pid))).then_some(v)
        });
        Agent { child, endpoints }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_for("the agent to stop", Duration::from_secs(20), || {
            self.child.try_wait().unwrap()
        });
        assert!(status.success(), "agent exit: {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
