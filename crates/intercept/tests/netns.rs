//! The real thing: iptables-restore, iptables-save and ip rule/route inside network namespaces
//! these tests create, and TCP/UDP traffic inside them. Needs root and the Debian `iptables` and `iproute2`
//! packages; says so loudly and passes when it cannot run.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use isthmus_intercept::{
    cleanup, cleanup_routes, install, install_routes, EnvFile, Family, InterceptConfig, Netfilter,
    SystemNetfilter, SystemRouting,
};

/// Deletes the namespace when the test ends, passing or not.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// iptables-save without its dated comments and counters.
fn nat(nf: &SystemNetfilter) -> anyhow::Result<String> {
    Ok(nf
        .save(Family::V4, "nat")?
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.find(" [")) {
            (true, Some(i)) => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

fn chain(save: &str, name: &str) -> Vec<String> {
    let prefix = format!("-A {name} ");
    save.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// Runs `ip -n NETNS <cmd>` for each command; the output of the last.
fn ip_in(netns: &str, cmds: &[&str]) -> anyhow::Result<String> {
    let mut out = String::new();
    for cmd in cmds {
        let mut args = vec!["ip", "-n", netns];
        args.extend(cmd.split(' '));
        out = run(&args)?;
    }
    Ok(out)
}

fn skip(why: &str) {
    eprintln!("!!!! SKIP real_iptables_in_a_network_namespace: {why}");
}

#[test]
fn real_iptables_in_a_network_namespace() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        skip("needs root (network namespaces and iptables)");
        return Ok(());
    }
    for tool in ["ip", "iptables-restore", "iptables-save", "bash", "timeout"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            skip(&format!(
                "{tool} not found (apt-get install -y iptables iproute2)"
            ));
            return Ok(());
        }
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
    let name = format!("isthmus-t-{}-{nanos}", std::process::id());
    if let Err(e) = run(&["ip", "netns", "add", &name]) {
        skip(&format!("cannot create a network namespace: {e}"));
        return Ok(());
    }
    let _guard = Netns(name.clone());
    ip_in(
        &name,
        &[
            "link set lo up",
            // The service CIDR routes out a veth whose peer has no address: nothing answers
            // there. (A veth, not a dummy: not every kernel has the dummy module.)
            "link add d0 type veth peer name d1",
            "addr add 10.96.0.1/12 dev d0",
            "link set d0 up",
            "link set d1 up",
        ],
    )?;

    let nf = SystemNetfilter::in_netns(&name);
    // What Docker does to a host: its own chain and rules ahead in OUTPUT and PREROUTING.
    nf.restore(
        Family::V4,
        "*nat\n:DOCKER - [0:0]\n-A DOCKER -j RETURN\n-A OUTPUT -d 10.0.0.0/8 -j ACCEPT\n\
         -A OUTPUT -j DOCKER\n-A PREROUTING -j DOCKER\nCOMMIT\n",
    )?;
    let before = nat(&nf)?;

    let config = InterceptConfig::from_env(
        &EnvFile::parse("cluster.env", "ISTIO_SERVICE_CIDR=10.96.0.0/12\n")?,
        &EnvFile::parse(
            "sidecar.env",
            "ISTIO_INBOUND_PORTS=8080\nISTIO_META_DNS_CAPTURE=true\n",
        )?,
        &[],
    )?;
    install(&nf, &config)?;
    let installed = nat(&nf)?;
    let output = chain(&installed, "OUTPUT");
    ensure!(
        output.len() == 4
            && output[0].ends_with("-j ISTHMUS_DNS")
            && output[1] == "-p tcp -j ISTHMUS_OUTPUT",
        "jumps not first in OUTPUT:\n{installed}"
    );
    ensure!(
        chain(&installed, "PREROUTING")[0] == "-p tcp -j ISTHMUS_INBOUND",
        "jump not first in PREROUTING:\n{installed}"
    );
    for c in [
        "ISTHMUS_OUTPUT",
        "ISTHMUS_REDIRECT",
        "ISTHMUS_INBOUND",
        "ISTHMUS_IN_REDIRECT",
        "ISTHMUS_DNS",
    ] {
        ensure!(
            installed.contains(&format!(":{c} -")),
            "no chain {c}:\n{installed}"
        );
    }

    install(&nf, &config)?;
    ensure!(nat(&nf)? == installed, "re-install changed the ruleset");

    // Something inserts itself ahead; a re-install puts the jumps back first, once.
    run(&[
        "ip", "netns", "exec", &name, "iptables", "-t", "nat", "-I", "OUTPUT", "1", "-j", "DOCKER",
    ])?;
    install(&nf, &config)?;
    let reinstalled = nat(&nf)?;
    let output = chain(&reinstalled, "OUTPUT");
    ensure!(
        output.len() == 5
            && output[1] == "-p tcp -j ISTHMUS_OUTPUT"
            && output[2] == "-j DOCKER"
            && output.iter().filter(|r| r.contains("ISTHMUS")).count() == 2,
        "jumps not first after re-install:\n{reinstalled}"
    );
    run(&[
        "ip", "netns", "exec", &name, "iptables", "-t", "nat", "-D", "OUTPUT", "-j", "DOCKER",
    ])?;

    traffic(&name).context("traffic inside the namespace")?;

    ensure!(cleanup(&nf)?, "cleanup found nothing to remove");
    let after = nat(&nf)?;
    ensure!(
        after == before,
        "cleanup left\n{after}\ninstead of\n{before}"
    );
    ensure!(!cleanup(&nf)?, "second cleanup found something");
    Ok(())
}

/// Runs on a thread that enters the namespace, so its sockets (and children) live there.
fn traffic(netns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{netns}");
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let ns = std::fs::File::open(&path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let timeout = Duration::from_secs(3);
        let capture = TcpListener::bind("127.0.0.1:15001")?;
        capture.set_nonblocking(true)?;
        let accept = |l: &TcpListener| -> anyhow::Result<Option<SocketAddr>> {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                match l.accept() {
                    Ok((_, peer)) => return Ok(Some(peer)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            return Ok(None);
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };

        // An app (root here, not the proxy uid) to a service VIP: captured on 15001.
        let vip: SocketAddr = "10.96.0.5:80".parse()?;
        let app = TcpStream::connect_timeout(&vip, timeout).context("app to the VIP")?;
        let peer = accept(&capture)?.context("nothing arrived on 15001")?;
        ensure!(
            peer == app.local_addr()?,
            "15001 got {peer}, not the app's connection"
        );

        // Loopback and the host's own address are left alone.
        for local in ["127.0.0.1:0", "10.96.0.1:0"] {
            let direct = TcpListener::bind(local)?;
            direct.set_nonblocking(true)?;
            TcpStream::connect_timeout(&direct.local_addr()?, timeout)?;
            ensure!(
                accept(&direct)?.is_some(),
                "{local}: not delivered directly"
            );
        }

        // DNS from an app goes to the agent's DNS proxy.
        let dns = UdpSocket::bind("127.0.0.1:15053")?;
        dns.set_read_timeout(Some(timeout))?;
        let client = UdpSocket::bind("0.0.0.0:0")?;
        client.send_to(b"query", "10.96.0.10:53")?;
        let mut buf = [0u8; 16];
        let (n, _) = dns
            .recv_from(&mut buf)
            .context("DNS not redirected to 15053")?;
        ensure!(&buf[..n] == b"query");

        // The proxy's own connection (uid/gid 1337) to the VIP is not captured: it goes out the
        // veth and nowhere.
        let status = Command::new("timeout")
            .args(["2", "bash", "-c", "exec 3<>/dev/tcp/10.96.0.5/80"])
            .uid(1337)
            .gid(1337)
            .status()?;
        ensure!(
            !status.success(),
            "the proxy's connection was answered: {status}"
        );
        if let Some(peer) = accept(&capture)? {
            bail!("the proxy's own connection was captured (from {peer})");
        }
        Ok(())
    });
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
}

/// `ISTHMUS_VIP_CIDR` for real: the rules and the table appear and go, the host's own route to
/// the network stays, and a captured connection's segment size follows loopback's MTU.
#[test]
fn vip_routes_through_loopback_in_a_network_namespace() -> anyhow::Result<()> {
    const TEST: &str = "vip_routes_through_loopback_in_a_network_namespace";
    if !nix::unistd::geteuid().is_root() {
        eprintln!("!!!! SKIP {TEST}: needs root (network namespaces, iptables, ip rule)");
        return Ok(());
    }
    for tool in ["ip", "iptables-restore", "iptables-save", "bash", "timeout"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!("!!!! SKIP {TEST}: {tool} not found (apt-get install -y iptables iproute2)");
            return Ok(());
        }
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
    let name = format!("isthmus-r-{}-{nanos}", std::process::id());
    if let Err(e) = run(&["ip", "netns", "add", &name]) {
        eprintln!("!!!! SKIP {TEST}: cannot create a network namespace: {e}");
        return Ok(());
    }
    let _guard = Netns(name.clone());
    // A VM's path to the service network: a 1,500-byte link.
    ip_in(
        &name,
        &[
            "link set lo up",
            "link add d0 type veth peer name d1",
            "addr add 10.77.0.2/24 dev d0",
            "link set d0 up",
            "link set d1 up",
            "route add 10.96.0.0/12 dev d0",
        ],
    )?;
    let ip = |args: &str| ip_in(&name, &[args]);
    let main_routes = ip("route show")?;

    let config = InterceptConfig::from_env(
        &EnvFile::parse("cluster.env", "ISTIO_SERVICE_CIDR=10.96.0.0/12\n")?,
        &EnvFile::parse("sidecar.env", "ISTHMUS_VIP_CIDR=10.96.0.0/16\n")?,
        &[],
    )?;
    let nf = SystemNetfilter::in_netns(&name);
    let rt = SystemRouting::in_netns(&name);
    install(&nf, &config)?;

    let (mss, _) = captured_connection(&name, "10.96.0.5:80").context("connection 1")?;
    ensure!(
        mss <= 1460,
        "through d0 the MSS is {mss}, expected at most 1460"
    );

    let changes = install_routes(&rt, &config)?;
    ensure!(changes.len() == 2, "{changes:?}");
    let rules = ip("rule show")?;
    ensure!(
        rules.contains("15001:\tfrom all to 10.96.0.0/16 lookup 15001"),
        "{rules}"
    );
    ensure!(
        ip("route show table 15001")?.trim() == "10.96.0.0/16 dev lo scope link",
        "{}",
        ip("route show table 15001")?
    );
    install_routes(&rt, &config)?;
    ensure!(ip("rule show")? == rules, "a re-install changed the rules");

    let (mss, source) = captured_connection(&name, "10.96.0.5:80").context("connection 2")?;
    ensure!(
        mss > 16_000,
        "through lo the MSS is {mss}, expected loopback's"
    );
    ensure!(
        source == "10.77.0.2".parse::<std::net::IpAddr>()?,
        "the app's source address became {source}"
    );
    // Outside the VIP network but inside the captured one: still d0's MSS.
    let (mss, _) = captured_connection(&name, "10.97.0.5:80").context("connection 3")?;
    ensure!(mss <= 1460, "10.97.0.5 got MSS {mss}");

    // Uncaptured traffic (the proxy's uid) to a VIP stays on the host and goes nowhere.
    let status = Command::new("ip")
        .args(["netns", "exec", &name, "timeout", "2", "bash", "-c"])
        .arg("exec 3<>/dev/tcp/10.96.0.5/80")
        .uid(1337)
        .gid(1337)
        .status()?;
    ensure!(!status.success(), "the proxy's connection was answered");

    ensure!(cleanup_routes(&rt)?, "cleanup found nothing");
    ensure!(!ip("rule show")?.contains("15001"), "{}", ip("rule show")?);
    ensure!(
        ip("route show")? == main_routes,
        "the host's routes changed:\n{}",
        ip("route show")?
    );
    ensure!(!cleanup_routes(&rt)?, "second cleanup found something");
    let (mss, _) = captured_connection(&name, "10.96.0.5:80").context("connection 4")?;
    ensure!(mss <= 1460, "after cleanup the MSS is {mss}");
    cleanup(&nf)?;
    Ok(())
}

/// Connects to `target` from inside the namespace, where the rules send it to 15001, and
/// returns the app socket's MSS once data has flowed, and the source address 15001 saw.
fn captured_connection(netns: &str, target: &str) -> anyhow::Result<(u32, std::net::IpAddr)> {
    let path = format!("/run/netns/{netns}");
    let target: SocketAddr = target.parse()?;
    std::thread::spawn(move || -> anyhow::Result<(u32, std::net::IpAddr)> {
        use std::io::{Read as _, Write as _};
        let ns = std::fs::File::open(&path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let capture = TcpListener::bind("127.0.0.1:15001")?;
        let mut app = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .with_context(|| format!("app to {target}"))?;
        let (mut proxy, peer) = capture.accept()?;
        // Enough bytes for the sender to leave its first, window-bound segments behind.
        let chunk = vec![7u8; 1 << 20];
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            std::io::copy(&mut (&mut proxy).take(4 << 20), &mut std::io::sink())
        });
        for _ in 0..4 {
            app.write_all(&chunk)?;
        }
        let got = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        ensure!(got == 4 << 20, "15001 read {got} bytes");
        let mss = nix::sys::socket::getsockopt(&app, nix::sys::socket::sockopt::TcpMaxSeg)?;
        Ok((mss, peer.ip()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connection thread panicked"))?
}
