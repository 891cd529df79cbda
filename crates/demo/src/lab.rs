//! Hosts as network namespaces on one bridge: what `isthmus demo` builds (and tears down), and
//! what the root-only tests build (through `tests/common/lab.rs`). Every side effect is an `ip`
//! command; `Drop` removes everything made, also on error.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// The service CIDR the mesh allocates VIPs from; every host routes it to its link so the
/// kernel hands connections to the interception rules.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

pub struct Lab {
    prefix: String,
    subnet: [u8; 3],
    namespaces: Vec<String>,
    /// Hosts added so far: numbers the bridge-side veth ends.
    hosts: u8,
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Lab {
    /// Creates the bridge namespace; hosts are added with [`Lab::add_host`]. Leftovers of an
    /// earlier run with the same prefix (killed before it could clean up) are removed first.
    pub fn new(prefix: &str, subnet: [u8; 3], logs: &Path) -> Result<Self> {
        let mut lab = Self {
            prefix: prefix.to_string(),
            subnet,
            namespaces: Vec::new(),
            hosts: 0,
            children: Vec::new(),
            logs: logs.to_path_buf(),
        };
        for ns in list_namespaces()? {
            if ns.starts_with(&format!("{prefix}-")) {
                delete_namespace(&ns);
            }
        }
        let sw = lab.ns("switch");
        lab.add_namespace(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn ip_of(&self, index: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, index)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        Ok(())
    }

    /// A host `name` with address `<subnet>.<index>/24` on the bridge; its resolver is
    /// `nameserver` (the agent's DNS capture answers for it).
    pub fn add_host(&mut self, name: &str, index: u8, nameserver: Ipv4Addr) -> Result<Ipv4Addr> {
        let addr = self.ip_of(index);
        self.add_host_at(name, addr, nameserver)?;
        Ok(addr)
    }

    /// A host `name` with address `addr/24` on the bridge, a route for the service CIDR through
    /// its link, and `nameserver` in its resolv.conf.
    pub fn add_host_at(&mut self, name: &str, addr: Ipv4Addr, nameserver: Ipv4Addr) -> Result<()> {
        let ns = self.ns(name);
        self.add_namespace(&ns)?;
        self.hosts += 1;
        // Made in the root namespace first: the prefix keeps concurrent labs apart, and the
        // name stays within IFNAMSIZ.
        let outer = format!(
            "{}v{}",
            &self.prefix[..self.prefix.len().min(10)],
            self.hosts
        );
        let sw = self.ns("switch");
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &outer, "netns", &sw])?;
        ip(&["-n", &sw, "link", "set", &outer, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // The kernel hands connections to the interception rules only if the VIPs route.
        ip(&["-n", &ns, "route", "add", SERVICE_CIDR, "dev", "eth0"])?;
        self.set_resolv_conf(name, &format!("nameserver {nameserver}\n"))
    }

    /// What `ip netns exec` bind-mounts over /etc/resolv.conf in `host`'s namespace.
    pub fn set_resolv_conf(&self, host: &str, text: &str) -> Result<()> {
        let etc = PathBuf::from(format!("/etc/netns/{}", self.ns(host)));
        std::fs::create_dir_all(&etc)
            .with_context(|| format!("cannot create {}", etc.display()))?;
        std::fs::write(etc.join("resolv.conf"), text)
            .with_context(|| format!("cannot write {}/resolv.conf", etc.display()))
    }

    /// `args` to run in `host`'s namespace, not started.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, host: &str, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).args(args);
        cmd
    }

    /// Runs `args` in `host`'s namespace in the background; its output goes to
    /// `<logs>/<label>.log`.
    pub fn spawn(&mut self, host: &str, label: &str, args: &[String]) -> Result<()> {
        let log = self.logs.join(format!("{label}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = self
            .command(host, args)
            .env("ISTHMUS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {label}"))?;
        self.children.push((label.to_string(), child));
        Ok(())
    }

    /// Fails if a background process has exited, naming it and pointing at its log.
    pub fn check_alive(&mut self) -> Result<()> {
        for (label, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{label} exited ({status}); its log: {}",
                    self.logs.join(format!("{label}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// Stops the background process `label` (SIGKILL) and waits for it.
    pub fn kill(&mut self, label: &str) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `args` in `host`'s namespace and waits for it.
    pub fn exec(&self, host: &str, args: &[String]) -> Result<Output> {
        self.command(host, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {args:?} in {host}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // SIGTERM first so agents remove their interception rules and drain.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for (_, child) in &mut self.children {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            delete_namespace(ns);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn list_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Deleting a namespace deletes the veth ends in it, and with them their peers.
fn delete_namespace(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
}
