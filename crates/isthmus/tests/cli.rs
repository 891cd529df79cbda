//! The operator's CLI against a real server: what a user types and sees.

mod common;
use common::*;

const BOOKINFO: &str = r#"apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo, labels: {app: reviews}}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-vm-1, namespace: bookinfo}
spec: {address: 10.0.1.10, serviceAccount: bookinfo-reviews, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: reviews, namespace: bookinfo}
spec:
  metadata: {labels: {app: reviews}}
  template: {serviceAccount: bookinfo-reviews, ports: {http: 9080}}
  probe: {periodSeconds: 5, httpGet: {path: /health, port: 9080}}
"#;

#[test]
fn register_is_idempotent_and_deregister_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());

    let out = s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    assert!(
        out.contains("Service onprem/mysql created (mysql.onprem.svc.cluster.local, VIP 10.96."),
        "{out}"
    );
    assert!(
        out.contains("WorkloadEntry onprem/mysql-10-0-0-5 created"),
        "{out}"
    );
    let again = s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    assert!(
        again.contains("Service onprem/mysql unchanged")
            && again.contains("mysql-10-0-0-5 unchanged"),
        "{again}"
    );

    // Same ip with a new label updates the entry rather than adding a second one.
    let upd = s.ok(&[
        "register", "mysql", "10.0.0.5", "3306", "-n", "onprem", "-l", "tier=db",
    ]);
    assert!(upd.contains("mysql-10-0-0-5 updated"), "{upd}");
    s.ok(&[
        "register",
        "mysql",
        "10.0.0.6",
        "mysql:3306",
        "-n",
        "onprem",
        "-s",
        "dba",
    ]);

    let table = s.ok(&["get", "workloads", "-n", "onprem"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("mysql-10-0-0-6") && l.contains("dba") && l.contains("HEALTHY")),
        "{table}"
    );
    let svcs = s.ok(&["get", "services", "-A"]);
    let row = svcs.lines().find(|l| l.starts_with("onprem")).unwrap();
    assert!(
        row.contains("mysql:3306/MYSQL") && row.split_whitespace().nth(4) == Some("2"),
        "{svcs}"
    );

    let sel = s.ok(&[
        "get",
        "workloads",
        "-n",
        "onprem",
        "-l",
        "tier=db",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&sel).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["spec"]["address"], "10.0.0.5");

    // The seeds' registration API shows both endpoints.
    let out = s.ok(&["deregister", "mysql", "10.0.0.5", "-n", "onprem"]);
    assert_eq!(out, "WorkloadEntry onprem/mysql-10-0-0-5 deleted\n");
    assert!(s
        .ok(&["get", "svc", "mysql", "-n", "onprem"])
        .contains("mysql"));
    let out = s.ok(&["deregister", "mysql", "10.0.0.6", "-n", "onprem"]);
    assert!(
        out.contains("Service onprem/mysql deleted (no endpoint left)"),
        "{out}"
    );
    let err = s.fails(&["get", "svc", "mysql", "-n", "onprem"]);
    assert_eq!(err, "error: Service onprem/mysql not found\n");
    let err = s.fails(&["deregister", "mysql", "10.0.0.6", "-n", "onprem"]);
    assert_eq!(err, "error: Service onprem/mysql not found\n");
}

#[test]
fn register_port_names_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&[
        "register",
        "web",
        "10.0.0.7",
        "80",
        "443",
        "grpc:9090",
        "9999",
        "-n",
        "shop",
    ]);
    let y = s.ok(&["get", "svc", "web", "-n", "shop", "-o", "yaml"]);
    for want in [
        "name: http\n    port: 80\n    protocol: HTTP",
        "name: https\n    port: 443",
        "name: grpc\n    port: 9090\n    protocol: GRPC",
        "name: '9999'",
    ] {
        assert!(y.contains(want), "missing {want:?} in\n{y}");
    }
    let err = s.fails(&["register", "web", "10.0.0.8", "http:8081", "-n", "shop"]);
    assert!(
        err.contains("service shop/web already has port \"http\" = 80"),
        "{err}"
    );
    let err = s.fails(&["register", "web", "10.0.0.8", "http:99999", "-n", "shop"]);
    assert!(
        err.contains("port \"http:99999\" is not a port number from 1 to 65535"),
        "{err}"
    );
    let err = s.fails(&["register", "web", "10.0.0.300", "80", "-n", "shop"]);
    assert_eq!(
        err,
        "error: IP \"10.0.0.300\" is not an IPv4 or IPv6 address\n"
    );
    let err = s.fails(&["register", "Web", "10.0.0.8", "80"]);
    assert!(
        err.contains("service name \"Web\" must consist of lower-case"),
        "{err}"
    );
    let err = s.fails(&["register", "web", "10.0.0.8", "80", "-l", "novalue"]);
    assert!(
        err.contains("--labels \"novalue\" must be KEY=VALUE"),
        "{err}"
    );
    // Nothing of the refused registrations was written.
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "we", "-A", "-o", "json"])).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
}

#[test]
fn apply_reports_changes_and_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let f = dir.path().join("bookinfo.yaml");
    std::fs::write(&f, BOOKINFO).unwrap();
    let out = s.ok(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(
        out,
        "Service bookinfo/reviews created\nWorkloadEntry bookinfo/reviews-vm-1 created\nWorkloadGroup bookinfo/reviews created\n"
    );
    let changed = BOOKINFO.replace("version: v1", "version: v2");
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(&changed));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Service bookinfo/reviews unchanged\nWorkloadEntry bookinfo/reviews-vm-1 updated\nWorkloadGroup bookinfo/reviews unchanged\n"
    );
    let wide = s.ok(&["get", "svc", "-n", "bookinfo", "-o", "wide"]);
    assert!(wide.contains("app=reviews"), "{wide}");
    let groups = s.ok(&["get", "groups", "-n", "bookinfo"]);
    assert!(
        groups.contains("http-get :9080/health every 5s"),
        "{groups}"
    );

    // A bad third document: nothing of the first two is written.
    let bad = format!(
        "{}---\napiVersion: isthmus.io/v1\nkind: Service\nmetadata: {{name: ratings, namespace: bookinfo}}\nspec: {{ports: [{{name: http, port: 9080}}]}}\n---\napiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {{name: bad, namespace: bookinfo}}\nspec: {{address: not-an-ip}}\n",
        ""
    );
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(&bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("document 2: WorkloadEntry bookinfo/bad is invalid: spec.address: \"not-an-ip\" is not an IPv4 or IPv6 address"), "{err}");
    s.fails(&["get", "svc", "ratings", "-n", "bookinfo"]);

    let out = s.cli_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Service\nmetadata: {name: [\n"),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("document 1: not valid YAML or JSON"));
    let err = s.fails(&["apply", "-f", "/nonexistent/file.yaml"]);
    assert!(
        err.starts_with("error: cannot read /nonexistent/file.yaml: No such file"),
        "{err}"
    );

    assert_eq!(
        s.ok(&["delete", "wg", "reviews", "-n", "bookinfo"]),
        "WorkloadGroup bookinfo/reviews deleted\n"
    );
    let err = s.fails(&["delete", "wg", "reviews", "-n", "bookinfo"]);
    assert_eq!(err, "error: WorkloadGroup bookinfo/reviews not found\n");
    assert_eq!(
        s.ok(&["get", "groups", "-n", "bookinfo"]),
        "No workloadgroups found in namespace bookinfo.\n"
    );
}

#[test]
fn connection_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out = std::process::Command::new(BIN)
        .args(["get", "svc", "--server", &s.admin, "--token", "wrong"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid admin token"));

    let out = std::process::Command::new(BIN)
        .args([
            "get",
            "svc",
            "--server",
            "http://127.0.0.1:1",
            "--token",
            "x",
        ])
        .env("XDG_CONFIG_HOME", s.home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the control plane at http://127.0.0.1:1")
            && err.contains("is `isthmus server` running"),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args(["get", "svc"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .env_remove("ISTHMUS_TOKEN")
        .env_remove("ISTHMUS_SERVER")
        .output()
        .unwrap();
    if !std::path::Path::new("/var/lib/isthmus/admin-token").exists() {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no admin token"),
            "{out:?}"
        );
    }

    // A config file, as --dev writes it, is enough on its own.
    let cfg = s.home.path().join("isthmus");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.json"),
        format!("{{\"server\":\"{}\",\"token\":\"{}\"}}", s.admin, s.token),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["get", "svc", "-A"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .env_remove("ISTHMUS_TOKEN")
        .env_remove("ISTHMUS_SERVER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(cfg.join("config.json"), "{not json").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["get", "svc"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .env_remove("ISTHMUS_TOKEN")
        .env_remove("ISTHMUS_SERVER")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config.json is unreadable"),
        "{out:?}"
    );
    assert!(s.fails(&["get", "pods"]).contains("unknown kind \"pods\""));
}

#[test]
fn unknown_kinds_list_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    // Every kind, with its aliases, is named wherever a kind is taken.
    let all = "the kinds are services (service, svc), workloadentries (workloadentry, workload, \
               workloads, we), workloadgroups (workloadgroup, group, groups, wg), \
               authorizationpolicies (authorizationpolicy, policy, policies, ap), \
               peerauthentications (peerauthentication, pa), virtualservices (virtualservice, vs), \
               destinationrules (destinationrule, dr), httproutes (httproute), grpcroutes (grpcroute)";
    for args in [&["get", "pods"][..], &["delete", "pods", "x"]] {
        let err = s.fails(args);
        assert!(err.contains("unknown kind \"pods\""), "{err}");
        assert!(err.contains(all), "{args:?}: {err}");
    }
    let doc = dir.path().join("pod.yaml");
    std::fs::write(
        &doc,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n",
    )
    .unwrap();
    let err = s.fails(&["apply", "-f", doc.to_str().unwrap()]);
    assert!(
        err.contains(
            "unknown kind \"Pod\" (expected Service, WorkloadEntry, WorkloadGroup, \
             AuthorizationPolicy, PeerAuthentication, VirtualService, DestinationRule, HTTPRoute, GRPCRoute)"
        ),
        "{err}"
    );
}

#[test]
fn get_watch_prints_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&["register", "a", "10.0.0.1", "80"]);
    let mut child = std::process::Command::new(BIN)
        .args(["get", "svc", "-A", "--watch", "-o", "json"])
        .env("ISTHMUS_SERVER", &s.admin)
        .env("ISTHMUS_TOKEN", &s.token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let next = || {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(15))
            .expect("a watch event");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let first = next();
    assert_eq!(
        (
            first["type"].as_str(),
            first["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("a"))
    );
    s.ok(&["register", "b", "10.0.0.2", "80"]);
    let ev = next();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    s.ok(&["deregister", "a", "10.0.0.1"]);
    let ev = next();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("a"))
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn completion_and_help() {
    let out = std::process::Command::new(BIN)
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("_isthmus()"));
    let out = std::process::Command::new(BIN)
        .args(["register", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("isthmus register mysql 10.0.0.5 3306 -n onprem"));
}

#[test]
fn the_cli_finds_the_admin_token_of_a_server_with_any_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let data_dir = std::fs::canonicalize(dir.path()).unwrap();
    let token_file = data_dir.join("admin-token");
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("XDG_CONFIG_HOME", s.home.path())
            .env_remove("ISTHMUS_TOKEN")
            .env_remove("ISTHMUS_SERVER")
            .env_remove("ISTHMUS_CONFIG")
            .output()
            .unwrap()
    };
    // The running server recorded where its data is: --server alone is enough.
    let out = cli(&["get", "svc", "-A", "--server", &s.admin]);
    assert!(out.status.success(), "{out:?}");

    // No token anywhere: the error says where the server keeps it and how to pass it.
    std::fs::rename(&token_file, data_dir.join("moved")).unwrap();
    let out = cli(&["get", "svc", "-A", "--server", &s.admin]);
    std::fs::rename(data_dir.join("moved"), &token_file).unwrap();
    let t = token_file.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "error: no admin token.\nhint: a server keeps its admin token in <data-dir>/admin-token (--data-dir, /var/lib/isthmus by default); \
             pass it with --token @{t} or ISTHMUS_TOKEN=$(cat {t}), or run `isthmus server --dev`, which writes {}",
            s.home.path().join("isthmus/config.json").display()
        )
    );

    // @FILE reads it; a path without @ is told to add it.
    let at = format!("@{t}");
    let out = cli(&["get", "svc", "-A", "--server", &s.admin, "--token", &at]);
    assert!(out.status.success(), "{out:?}");
    let path = t.to_string();
    let out = cli(&["get", "svc", "-A", "--server", &s.admin, "--token", &path]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!("error: --token \"{t}\" looks like a file, not a token: write --token @{t} to read the token from that file")
    );
}

#[test]
fn vm_config_says_loudly_when_hosts_cannot_reach_the_mesh_dns() {
    // The harness's server has its DNS on loopback; the bundle is for a host elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out_dir = dir.path().join("vm");
    let out = s.cli(&[
        "vm",
        "config",
        "-o",
        out_dir.to_str().unwrap(),
        "--control-plane",
        "10.0.0.2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let port = s.dns.rsplit(':').next().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "WARNING: the mesh DNS listens on {} only (loopback), which other hosts cannot reach: \
             the bundle's kubedns sends mesh names to 10.0.0.2:{port}, where nothing answers.\n\
             fix: restart the server with --dns-addr 0.0.0.0:{port} (and open UDP/TCP {port} to the hosts), then run `isthmus vm config` again",
            s.dns
        )
    );
}

#[test]
fn dev_mode_prints_what_to_do_and_writes_the_cli_config() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["server", "--dev"])
        .args(ANY_PORTS)
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("ISTHMUS_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let field = |name: &str| {
        banner
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in\n{banner}"))
    };
    let token = field("admin token");
    let admin = field("admin API");
    let data_dir = banner
        .split("data in ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    assert!(
        banner.contains("isthmus register mysql 10.0.0.5 3306 -n onprem"),
        "{banner}"
    );
    let grpc_port = field("certificate API")
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(
        banner.contains(&format!(
            "hosts reach this control plane at 127.0.0.1:{grpc_port} (--advertise-ip to change)\n"
        )),
        "{banner}"
    );
    assert!(std::path::Path::new(&data_dir)
        .join("registry.redb")
        .exists());

    let cfg = home.path().join("isthmus/config.json");
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(
        (v["server"].as_str().unwrap(), v["token"].as_str().unwrap()),
        (admin.as_str(), token.as_str())
    );

    // The CLI needs nothing but that file.
    let out = std::process::Command::new(BIN)
        .args(["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"])
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("ISTHMUS_TOKEN")
        .env_remove("ISTHMUS_SERVER")
        .env_remove("ISTHMUS_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "the --dev data dir is removed at exit"
    );
}

#[test]
fn iptables_dry_run_from_the_seed_files() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.env");
    let sidecar = dir.path().join("sidecar.env");
    std::fs::write(
        &cluster,
        "ISTIO_SERVICE_CIDR=10.96.0.0/12\nISTIO_CP_AUTH=MUTUAL_TLS\n",
    )
    .unwrap();
    std::fs::write(&sidecar, "ISTIO_INBOUND_PORTS=3306,8080\n").unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["iptables", "--dry-run", "--cluster-env"])
            .arg(&cluster)
            .arg("--sidecar-env")
            .arg(&sidecar)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(out.status.success(), "{out:?}");
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        rules.contains("*nat") && rules.contains("COMMIT"),
        "{rules}"
    );
    assert!(
        rules.contains("-d 10.96.0.0/12") && rules.contains("--to-ports 15001"),
        "{rules}"
    );
    assert!(
        rules.contains("--dport 3306") && rules.contains("--to-ports 15006"),
        "{rules}"
    );
    assert!(
        rules.contains("--uid-owner 1337"),
        "the proxy's own traffic is exempt: {rules}"
    );

    assert!(out.stderr.is_empty(), "{out:?}");

    // Without ISTIO_SERVICE_CIDR: nothing captured outbound, and the same warning as the agent's
    // refusal on stderr; stdout is still iptables-restore input.
    std::fs::write(&cluster, "ISTIO_CP_AUTH=MUTUAL_TLS\n").unwrap();
    let out = run(&[]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let p = cluster.display();
    assert!(
        err.contains(&format!(
            "warning: refusing to capture: {p} does not set ISTIO_SERVICE_CIDR"
        )) && err.contains("ISTIO_SERVICE_CIDR=* to capture every destination"),
        "{err}"
    );
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        !rules.contains("-j ISTHMUS_REDIRECT") && rules.contains("COMMIT"),
        "{rules}"
    );
    std::fs::write(&cluster, "ISTIO_SERVICE_CIDR=10.96.0.0/12\n").unwrap();

    let out = run(&["-e", "ISTIO_INBOUND_PORTS=80,http"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ISTIO_INBOUND_PORTS=\"80,http\": \"http\" is not a port"),
        "{err}"
    );
}

/// VirtualServices and DestinationRules apply as Istio users write them; a route to a subset
/// no DestinationRule defines is refused with the route named, and nothing of the input is
/// written; other bad fields are named by path and value.
#[test]
fn traffic_resources_apply_and_bad_ones_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v3}}\n";
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}]\n";
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(vs));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: VirtualService bookinfo/reviews: spec.http[0].route[0].destination.subset: \"v3\" is not a subset of any DestinationRule for reviews.bookinfo; define it (spec.subsets) in a DestinationRule whose host is that service, in the same input or before"),
        "{err}"
    );
    // With the rule in the same input, still v3 is missing: refused whole, the rule unwritten.
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(&format!("{dr}---\n{vs}")));
    assert!(!out.status.success());
    assert!(!s.ok(&["get", "dr", "-n", "bookinfo"]).contains("reviews"));
    // Weights that do not add up, an unknown field: named.
    let bad = vs.replace(
        "- {destination: {host: reviews, subset: v3}}",
        "- {destination: {host: reviews}, weight: 60}\n    - {destination: {host: reviews}, weight: 60}",
    );
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(&bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.http[0].route[*].weight: \"[60, 60] = 120\" must add up to 100"),
        "{err}"
    );
    let out = s.cli_stdin(
        &["apply", "-f", "-"],
        Some(&vs.replace("hosts: [reviews]", "hosts: [reviews]\n  tcp: []")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `tcp`"), "{err}");
    // Good input applies, and lists.
    let good = format!("{dr}---\n{}", vs.replace("subset: v3", "subset: v1"));
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(&good));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = s.ok(&["get", "vs", "-n", "bookinfo"]);
    assert!(list.contains("reviews") && list.contains("HOSTS"), "{list}");
}
