//! The seeds' scenario end to end, in network namespaces (root only; CI runs as root): a
//! control-plane host; mesh hosts serving `productpage` and `reviews` in `bookinfo` (a second,
//! unhealthy `productpage` member checks that health is respected); and a "VM" host with its own
//! agent, `cluster.env` and `sidecar.env`, all on one bridge. Nothing leaves the namespaces.

mod common;
#[path = "common/lab.rs"]
mod lab;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{wait_for, BIN};
use lab::Lab;

const CP: &str = "10.77.0.1";
const MESH: &str = "10.77.0.2";
const VM: &str = "10.77.0.3";
const REVIEWS: &str = "10.77.0.4";
/// A second productpage member whose probe fails until the test makes it pass.
const MESH3: &str = "10.77.0.5";

fn wait_file_json(path: &Path) -> serde_json::Value {
    wait_for(
        &format!("{}", path.display()),
        Duration::from_secs(30),
        || serde_json::from_slice(&std::fs::read(path).ok()?).ok(),
    )
}

/// The threads of a process named `isthmus-proxy`: the agent's data-plane workers.
fn proxy_threads(pid: u32) -> usize {
    proxy_slices(pid).len()
}

/// The scheduler slice (ns) of each `isthmus-proxy` thread of `pid`, from
/// /proc/PID/task/TID/sched (`se.slice`, EEVDF kernels); `None` for a thread without it.
fn proxy_slices(pid: u32) -> Vec<Option<u64>> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "isthmus-proxy")
        })
        .map(|t| {
            isthmus_agent::sched::slice_in(&std::fs::read_to_string(t.path().join("sched")).ok()?)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn start_agent(
    lab: &mut Lab,
    host: &str,
    ip: &str,
    dir: &Path,
    token: &str,
    sidecar: &str,
    extra: &[&str],
) -> serde_json::Value {
    let certs = dir.join("certs");
    let state = dir.join("state");
    std::fs::write(dir.join("token"), token).unwrap();
    std::fs::write(
        dir.join("cluster.env"),
        "ISTIO_SERVICE_CIDR=10.96.0.0/12\nISTIO_META_DNS_CAPTURE=true\n",
    )
    .unwrap();
    std::fs::write(dir.join("sidecar.env"), sidecar).unwrap();
    let _ = std::fs::remove_file(state.join("agent-endpoints.json"));
    let mut args: Vec<String> = [
        BIN,
        "agent",
        "--ca-addr",
        &format!("https://{CP}:15012"),
        "--ip",
        ip,
        "--proxy",
        "--capture",
        "--metrics-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
        "--dns-upstream",
        "127.0.0.1:9",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, p) in [("--cert-dir", &certs), ("--state-dir", &state)] {
        args.push(flag.into());
        args.push(p.display().to_string());
    }
    for (flag, f) in [
        ("--join-token-file", "token"),
        ("--cluster-env", "cluster.env"),
        ("--sidecar-env", "sidecar.env"),
    ] {
        args.push(flag.into());
        args.push(dir.join(f).display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(host, &refs, &[("ISTHMUS_LOG", "warn")]);
    wait_file_json(&state.join("agent-endpoints.json"))
}

#[test]
fn seeds_scenario_in_network_namespaces() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("!!!! SKIP seeds_scenario_in_network_namespaces: needs root (network namespaces, iptables) !!!!");
        return;
    }
    let mut lab = Lab::new(
        "i",
        &[
            ("cp", CP),
            ("mesh", MESH),
            ("vm", VM),
            ("reviews", REVIEWS),
            ("mesh3", MESH3),
        ],
        // Name resolution goes to the control plane's address; each agent's DNS capture
        // takes it.
        CP,
    );
    let work = tempfile::tempdir().unwrap();
    let cp_dir = work.path().join("cp");
    let args = lab::control_plane_args(&cp_dir, CP, &["--autoreg-grace", "30s"]);
    lab.spawn(
        "cp",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("ISTHMUS_LOG", "warn")],
    );
    let ep = wait_file_json(&cp_dir.join("endpoints.json"));
    let admin = ep["admin"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(cp_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let cli = |lab: &Lab, args: &[&str], stdin: Option<&str>| -> String {
        let mut cmd = lab.command("cp", &[BIN]);
        cmd.args(args)
            .env("ISTHMUS_SERVER", &admin)
            .env("ISTHMUS_TOKEN", &token);
        let out = common::output_with_stdin(cmd, stdin);
        assert!(
            out.status.success(),
            "isthmus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // The mesh: productpage and reviews in bookinfo, served by mesh hosts that join through
    // groups; productpage's group has a probe, so its members start unhealthy.
    cli(&lab, &["apply", "-f", "-"], Some(
        "apiVersion: v1\nkind: Service\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  selector: {app: productpage}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  metadata: {labels: {app: productpage}}\n  template: {serviceAccount: productpage, ports: {http: 9080}}\n  probe: {httpGet: {port: 9080, path: /healthz}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  metadata: {labels: {app: reviews}}\n  template: {serviceAccount: reviews, ports: {http: 9080}}\n",
    ));
    let host_dirs: Vec<PathBuf> = ["mesh", "vm", "reviews", "mesh3"]
        .iter()
        .map(|h| work.path().join(h))
        .collect();
    for d in &host_dirs {
        std::fs::create_dir_all(d).unwrap();
        cli(
            &lab,
            &["vm", "certs", "-o", d.join("certs").to_str().unwrap()],
            None,
        );
    }
    let mesh_token = cli(
        &lab,
        &["token", "create", "-n", "bookinfo", "-s", "productpage"],
        None,
    );
    let reviews_token = cli(
        &lab,
        &["token", "create", "-n", "bookinfo", "-s", "reviews"],
        None,
    );
    let vm_token = cli(
        &lab,
        &["token", "create", "-n", "onprem", "-s", "mysql"],
        None,
    );

    // Apps: productpage on the mesh host and on mesh3 (each page names its host; mesh3 has no
    // /healthz yet, so its probe fails), reviews on its host, "mysql" (an HTTP server on 3306,
    // for curl) on the VM.
    let site = |host: &str, healthy: bool| -> PathBuf {
        let d = work.path().join(format!("site-{host}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("index.html"), format!("served by {host}\n")).unwrap();
        if healthy {
            std::fs::write(d.join("healthz"), "ok\n").unwrap();
        }
        d
    };
    for (host, healthy) in [("mesh", true), ("mesh3", false), ("reviews", true)] {
        let d = site(host, healthy);
        lab.spawn(
            host,
            &[
                "python3",
                "-m",
                "http.server",
                "9080",
                "--directory",
                d.to_str().unwrap(),
            ],
            &[],
        );
    }
    lab.spawn(
        "vm",
        &["python3", "-m", "http.server", "3306", "--bind", VM],
        &[],
    );
    // The mesh host captures its app port inbound; whether plaintext may pass is the control
    // plane's PeerAuthentication.
    let mesh_ready = start_agent(
        &mut lab,
        "mesh",
        MESH,
        &host_dirs[0],
        &mesh_token,
        "ISTIO_INBOUND_PORTS=9080\n",
        &[
            "--group",
            "productpage",
            "--probe-http",
            "9080/healthz",
            "--probe-period",
            "1s",
            // Its proxy on a multi-thread runtime (ISTHMUS_WORKER_THREADS); the others on
            // the default single thread.
            "--worker-threads",
            "2",
        ],
    );
    let mesh_pid = lab.children.last().expect("the mesh agent").id();
    let reviews_ready = start_agent(
        &mut lab,
        "reviews",
        REVIEWS,
        &host_dirs[2],
        &reviews_token,
        "ISTIO_INBOUND_PORTS=9080\n",
        // The kernel's default scheduler slice (ISTHMUS_SCHED_SLICE=0); the others the default.
        &["--group", "reviews", "--sched-slice", "0"],
    );
    let reviews_pid = lab.children.last().expect("the reviews agent").id();
    let mesh3_ready = start_agent(
        &mut lab,
        "mesh3",
        MESH3,
        &host_dirs[3],
        &mesh_token,
        "ISTIO_INBOUND_PORTS=9080\n",
        &[
            "--group",
            "productpage",
            "--probe-http",
            "9080/healthz",
            "--probe-period",
            "1s",
            "--probe-failure-threshold",
            "1",
        ],
    );
    let vm_ready = start_agent(
        &mut lab,
        "vm",
        VM,
        &host_dirs[1],
        &vm_token,
        // The VM routes the service network through lo (ISTHMUS_VIP_CIDR); the mesh hosts
        // keep their route out of eth0. Both must capture.
        "ISTIO_INBOUND_PORTS=3306\nISTHMUS_VIP_CIDR=10.96.0.0/12\n",
        &[],
    );
    let vm_pid = lab.children.last().expect("the VM agent").id();
    for (host, url) in [
        ("mesh", &mesh_ready),
        ("vm", &vm_ready),
        ("reviews", &reviews_ready),
        ("mesh3", &mesh3_ready),
    ] {
        wait_for(
            &format!("{host} agent ready"),
            Duration::from_secs(30),
            || {
                let out = lab.exec(
                    host,
                    &[
                        "curl",
                        "-sf",
                        "--max-time",
                        "2",
                        &format!("{}/healthz/ready", url["readiness"].as_str().unwrap()),
                    ],
                );
                out.status.success().then_some(())
            },
        );
    }

    for (pid, threads) in [(mesh_pid, 2), (vm_pid, 1)] {
        assert_eq!(
            proxy_threads(pid),
            threads,
            "agent {pid} should run its proxy on {threads} isthmus-proxy thread(s)"
        );
    }
    // Every data-plane thread asked for the 100 µs slice (ISTHMUS_SCHED_SLICE's default), where
    // the kernel takes a slice per thread (EEVDF, 6.12 and later); with 0 they keep the
    // kernel's default.
    let default_slices = proxy_slices(reviews_pid);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut version = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let custom_slices = (version.next(), version.next()) >= (Some(6), Some(12));
    if custom_slices
        && default_slices
            .iter()
            .all(|s| s.is_some_and(|ns| ns != 100_000))
    {
        for pid in [mesh_pid, vm_pid] {
            let slices = proxy_slices(pid);
            assert!(
                !slices.is_empty() && slices.iter().all(|s| *s == Some(100_000)),
                "agent {pid}'s isthmus-proxy threads should have a 100 µs slice: {slices:?} (ns)"
            );
        }
    } else {
        eprintln!(
            "NOTE: kernel {} takes no per-thread slice (6.12 and later do; se.slice: {default_slices:?}); the data-plane threads' ISTHMUS_SCHED_SLICE is not checked",
            release.trim()
        );
    }
    // On the VM, the app calls productpage by name: resolved by the agent's DNS (captured port
    // 53), captured on 15001, tunnelled over HBONE to the mesh host.
    let curl = |lab: &Lab, host: &str, url: &str| {
        lab.exec(
            host,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                url,
            ],
        )
    };
    let code = |o: Output| String::from_utf8_lossy(&o.stdout).to_string();
    wait_for(
        "productpage through the mesh from the VM",
        Duration::from_secs(30),
        || {
            (code(curl(
                &lab,
                "vm",
                "http://productpage.bookinfo.svc.cluster.local:9080/",
            )) == "200")
                .then_some(())
        },
    );
    let rules =
        String::from_utf8_lossy(&lab.exec("vm", &["ip", "rule", "show"]).stdout).to_string();
    assert!(
        rules.contains("15001:\tfrom all to 10.96.0.0/12 lookup 15001"),
        "the VM agent's VIP route rule is missing:\n{rules}"
    );
    // Health: mesh3's probe fails, so its productpage entry is UNHEALTHY and the VM's proxy never
    // sends it a connection while mesh's is healthy.
    let entry_line = |lab: &Lab, ip: &str| -> String {
        cli(lab, &["get", "workloads", "-n", "bookinfo"], None)
            .lines()
            .find(|l| l.contains(ip))
            .unwrap_or_default()
            .to_lowercase()
    };
    wait_for(
        "mesh3's entry registered unhealthy",
        Duration::from_secs(30),
        || entry_line(&lab, MESH3).contains("unhealthy").then_some(()),
    );
    let body = |lab: &Lab, host: &str, url: &str| -> String {
        let o = lab.exec(host, &["curl", "-s", "--max-time", "5", url]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // What the VM's proxy knows of a workload's health (its admin config dump).
    let vm_view = |lab: &Lab, ip: &str| -> Option<String> {
        let o = lab.exec(
            "vm",
            &[
                "curl",
                "-sf",
                "--max-time",
                "2",
                &format!("{}/config_dump", vm_ready["admin"].as_str().unwrap()),
            ],
        );
        let dump: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        dump["discovery"]["workloads"]
            .as_array()?
            .iter()
            .find(|w| {
                w["addresses"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == ip))
            })
            .map(|w| w["health"].as_str().unwrap_or_default().to_lowercase())
    };
    wait_for(
        "the VM to see mesh healthy and mesh3 unhealthy",
        Duration::from_secs(30),
        || {
            (vm_view(&lab, MESH)? == "healthy" && vm_view(&lab, MESH3)? == "unhealthy")
                .then_some(())
        },
    );
    for i in 0..20 {
        assert_eq!(
            body(
                &lab,
                "vm",
                "http://productpage.bookinfo.svc.cluster.local:9080/"
            ),
            "served by mesh",
            "request {i}: only the healthy productpage endpoint gets traffic"
        );
    }
    // Its app recovers: the probe passes, the entry turns healthy, and it takes its share.
    std::fs::write(work.path().join("site-mesh3/healthz"), "ok\n").unwrap();
    wait_for(
        "traffic to mesh3 once healthy",
        Duration::from_secs(30),
        || {
            (body(
                &lab,
                "vm",
                "http://productpage.bookinfo.svc.cluster.local:9080/",
            ) == "served by mesh3")
                .then_some(())
        },
    );
    // reviews, on its own host, from the VM and from the productpage host.
    for host in ["vm", "mesh"] {
        wait_for(
            &format!("reviews from {host}"),
            Duration::from_secs(30),
            || {
                (body(
                    &lab,
                    host,
                    "http://reviews.bookinfo.svc.cluster.local:9080/",
                ) == "served by reviews")
                    .then_some(())
            },
        );
    }

    // PERMISSIVE (the default) lets plaintext from outside the mesh reach the app port; a
    // PeerAuthentication STRICT for bookinfo makes it refuse, while the mTLS path keeps working.
    assert_eq!(
        code(curl(&lab, "vm", &format!("http://{MESH}:9080/"))),
        "200",
        "PERMISSIVE passes plaintext"
    );
    cli(&lab, &["apply", "-f", "-"], Some(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n",
    ));
    wait_for(
        "STRICT to refuse plaintext",
        Duration::from_secs(30),
        || (code(curl(&lab, "vm", &format!("http://{MESH}:9080/"))) != "200").then_some(()),
    );
    assert_eq!(
        code(curl(
            &lab,
            "vm",
            "http://productpage.bookinfo.svc.cluster.local:9080/"
        )),
        "200",
        "mTLS still passes"
    );

    // Back the other way: the VM's MySQL registered as the seeds did, reached from the mesh host.
    // The VM's agent is connected as onprem/mysql: the endpoint takes that service account, so
    // the mesh reaches it over HBONE and its certificate matches.
    let registered = cli(
        &lab,
        &["register", "mysql", VM, "3306", "-n", "onprem"],
        None,
    );
    assert!(registered.contains("Service account mysql"), "{registered}");
    wait_for(
        "mysql on the VM from the mesh host",
        Duration::from_secs(30),
        || {
            (code(curl(
                &lab,
                "mesh",
                "http://mysql.onprem.svc.cluster.local:3306/",
            )) == "200")
                .then_some(())
        },
    );

    // Mesh to VM is mTLS: with STRICT for onprem the VM refuses plaintext to its port from the
    // mesh host, and the call by name (tunnelled) still passes.
    cli(&lab, &["apply", "-f", "-"], Some(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: onprem}\nspec: {mtls: {mode: STRICT}}\n",
    ));
    wait_for(
        "STRICT on the VM to refuse plaintext",
        Duration::from_secs(30),
        || (code(curl(&lab, "mesh", &format!("http://{VM}:3306/"))) != "200").then_some(()),
    );
    assert_eq!(
        code(curl(
            &lab,
            "mesh",
            "http://mysql.onprem.svc.cluster.local:3306/"
        )),
        "200",
        "mesh to VM over HBONE"
    );

    // A policy denying the VM's namespace blocks it; removing it lets it through again.
    cli(&lab, &["apply", "-f", "-"], Some(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-onprem, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: productpage}}\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [onprem]}\n",
    ));
    wait_for(
        "the policy to block the VM",
        Duration::from_secs(30),
        || {
            (code(curl(
                &lab,
                "vm",
                "http://productpage.bookinfo.svc.cluster.local:9080/",
            )) != "200")
                .then_some(())
        },
    );
    cli(&lab, &["delete", "ap", "no-onprem", "-n", "bookinfo"], None);
    wait_for("the VM let through again", Duration::from_secs(30), || {
        (code(curl(
            &lab,
            "vm",
            "http://productpage.bookinfo.svc.cluster.local:9080/",
        )) == "200")
            .then_some(())
    });

    // The control plane dies: traffic goes on from the hosts' last good state.
    let cp = lab.children.remove(0);
    let mut cp = cp;
    let _ = cp.kill();
    let _ = cp.wait();
    assert_eq!(
        code(curl(
            &lab,
            "vm",
            "http://productpage.bookinfo.svc.cluster.local:9080/"
        )),
        "200"
    );
    // It returns: new registrations flow again.
    lab.spawn(
        "cp",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("ISTHMUS_LOG", "warn")],
    );
    wait_for("the control plane back", Duration::from_secs(30), || {
        let ep: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cp_dir.join("endpoints.json")).ok()?).ok()?;
        (ep["admin"].as_str()? != admin).then_some(())
    });
    let ep = wait_file_json(&cp_dir.join("endpoints.json"));
    let admin2 = ep["admin"].as_str().unwrap().to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("cp"),
            BIN,
            "register",
            "mysql-replica",
            VM,
            "3306",
            "-n",
            "onprem",
            // The VM's agent may not have reconnected yet to say who it is.
            "-s",
            "mysql",
        ])
        .env("ISTHMUS_SERVER", &admin2)
        .env("ISTHMUS_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "the new registration on the mesh host",
        Duration::from_secs(30),
        || {
            (code(curl(
                &lab,
                "mesh",
                "http://mysql-replica.onprem.svc.cluster.local:3306/",
            )) == "200")
                .then_some(())
        },
    );
}
