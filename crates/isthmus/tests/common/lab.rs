//! Network namespaces on one bridge, as `netns.rs` builds them (root only): one namespace per
//! host with `eth0` on a private /24, a route for the service CIDR, and its own resolv.conf
//! pointing at the first host. Everything is removed on drop.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};

pub struct Lab {
    /// Prefix of every name, so that labs of different tests never collide.
    prefix: &'static str,
    id: String,
    names: Vec<String>,
    pub children: Vec<Child>,
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// `hosts`: (name, IPv4) pairs on a /24; resolv.conf of each names `nameserver`.
    pub fn new(prefix: &'static str, hosts: &[(&str, &str)], nameserver: &str) -> Lab {
        let id = format!("{}", std::process::id() % 100_000);
        let mut lab = Lab {
            prefix,
            id: id.clone(),
            names: Vec::new(),
            children: Vec::new(),
        };
        let sw = format!("{prefix}sw-{id}");
        sh(&["ip", "netns", "add", &sw]);
        lab.names.push(sw.clone());
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (host, ip) in hosts {
            let ns = lab.ns(host);
            sh(&["ip", "netns", "add", &ns]);
            lab.names.push(ns.clone());
            let outer = format!("{prefix}v{host}{id}");
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            sh(&["ip", "link", "set", &outer, "netns", &sw]);
            sh(&[
                "ip", "-n", &sw, "link", "set", &outer, "master", "br0", "up",
            ]);
            let cidr = format!("{ip}/24");
            sh(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            // The service CIDR needs a route for the kernel to hand connections to the rules.
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "10.96.0.0/12",
                "dev",
                "eth0",
            ]);
            lab.set_resolv_conf(host, &format!("nameserver {nameserver}\n"));
        }
        lab
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}-{}", self.prefix, self.id)
    }

    /// What `ip netns exec` mounts over /etc/resolv.conf in the host's namespace.
    pub fn set_resolv_conf(&self, host: &str, text: &str) {
        let etc = format!("/etc/netns/{}", self.ns(host));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), text).unwrap();
    }

    pub fn command(&self, host: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).args(args);
        cmd
    }

    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        self.command(host, args).output().unwrap()
    }

    /// Starts a process in the host's namespace; it is killed with the lab.
    pub fn spawn(&mut self, host: &str, args: &[&str], envs: &[(&str, &str)]) {
        let child = self.start(host, args, envs);
        self.children.push(child);
    }

    /// Starts a process in the host's namespace; the caller owns it.
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
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{n}"));
        }
    }
}
