//! Network namespaces on one bridge for the root-only tests: `isthmus demo`'s own lab (one
//! namespace per host with `eth0` on a private /24, a route for the service CIDR, its own
//! resolv.conf), with the processes a test starts killed first on drop, then every namespace
//! removed.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// `isthmus server` for a lab's control-plane host at `ip`: its data in `dir`, gRPC (CA and
/// discovery) and DNS on `ip`, the admin, registration and metrics ports on free loopback
/// ports, then `extra`.
pub fn control_plane_args(dir: &Path, ip: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        env!("CARGO_BIN_EXE_isthmus"),
        "server",
        "--data-dir",
        &dir.display().to_string(),
        "--admin-addr",
        "127.0.0.1:0",
        "--registration-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        &format!("{ip}:15012"),
        "--dns-addr",
        &format!("{ip}:15054"),
        "--server-ip",
        ip,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub struct Lab {
    inner: isthmus_demo::lab::Lab,
    /// Processes started with [`Lab::spawn`]; a test may take one out to stop it itself.
    pub children: Vec<Child>,
}

impl Lab {
    /// `hosts`: (name, IPv4) pairs on one /24; resolv.conf of each names `nameserver`. Names
    /// carry `prefix` and this process's id, so concurrent tests never collide.
    pub fn new(prefix: &str, hosts: &[(&str, &str)], nameserver: &str) -> Lab {
        let prefix = format!("{prefix}{}", std::process::id() % 100_000);
        let logs = std::env::temp_dir();
        let first: Ipv4Addr = hosts[0].1.parse().unwrap();
        let [a, b, c, _] = first.octets();
        let mut inner = isthmus_demo::lab::Lab::new(&prefix, [a, b, c], &logs).unwrap();
        let nameserver: Ipv4Addr = nameserver.parse().unwrap();
        for (host, ip) in hosts {
            inner
                .add_host_at(host, ip.parse().unwrap(), nameserver)
                .unwrap();
        }
        Lab {
            inner,
            children: Vec::new(),
        }
    }

    pub fn ns(&self, host: &str) -> String {
        self.inner.ns(host)
    }

    /// What `ip netns exec` mounts over /etc/resolv.conf in the host's namespace.
    pub fn set_resolv_conf(&self, host: &str, text: &str) {
        self.inner.set_resolv_conf(host, text).unwrap();
    }

    pub fn command(&self, host: &str, args: &[&str]) -> Command {
        self.inner.command(host, args)
    }

    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        self.command(host, args).output().unwrap()
    }

    /// Starts a process in the host's namespace; it is killed with the lab.
    pub fn spawn(&mut self, host: &str, args: &[&str], envs: &[(&str, &str)]) {
        let child = self.start(host, args, envs);
        self.children.push(child);
    }

    /// Starts a process in the host's namespace (stdout dropped, stderr the test's); the caller
    /// owns it.
    pub fn start(&self, host: &str, args: &[&str], envs: &[(&str, &str)]) -> Child {
        let mut cmd = self.command(host, args);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }
}

impl Drop for Lab {
    /// Kills the test's processes; `inner` then removes the namespaces when it drops.
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
