//! `isthmus vm config`: everything a host needs to join the mesh, in the seeds' formats
//! (docs/host-layout.md says where `join` puts each file). The server is asked first, the files
//! are built in memory, then written whole: a temporary directory renamed into place, and/or a
//! .tar.gz written atomically. On any error nothing is left behind.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use isthmus_control_plane::api::MeshInfo;
use isthmus_model::validate::{dns_label_problem, dns_subdomain_problem};
use isthmus_model::Resource;
use reqwest::Method;
use serde_json::Value;

use crate::args::Connection;
use crate::client::{enc, Client, ClientError};

use isthmus_control_plane::hostfiles::{self, join_ports, BundleFile, HostConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct VmConfigArgs {
    /// The host's namespace.
    #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The host's service account [default: the group's template's, else `default`].
    #[arg(short = 's', long)]
    pub service_account: Option<String>,
    /// The WorkloadGroup (in --namespace) the host joins: its template gives the service
    /// account and the inbound ports, and the agent registers the host as a member.
    #[arg(long)]
    pub group: Option<String>,
    /// Directory to create (it must not exist, or be empty).
    #[arg(short, long = "output-dir", required_unless_present = "archive")]
    pub output_dir: Option<PathBuf>,
    /// Also (or instead) write everything as one .tar.gz (mode 0600).
    #[arg(long, value_name = "FILE.tar.gz")]
    pub archive: Option<PathBuf>,
    /// The address hosts reach the control plane's gRPC port at [default: what the server
    /// advertises (--advertise-ip), with its gRPC port].
    #[arg(long, value_name = "IP[:PORT]")]
    pub control_plane: Option<String>,
    /// Ports to capture inbound (sidecar.env's ISTIO_INBOUND_PORTS): `3306,8080`, `*` for all,
    /// `""` for none [default: the group's template ports, else none].
    #[arg(long, value_name = "PORTS")]
    pub inbound_ports: Option<String>,
    /// The host's mesh IP (ISTIO_SVC_IP) [default: the agent picks the address that routes to
    /// the control plane].
    #[arg(long)]
    pub ip: Option<IpAddr>,
    /// Lifetime of the join token (e.g. 30m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    pub token_ttl: String,
    /// How many certificates the token may obtain [default: any number until it expires].
    #[arg(long)]
    pub token_uses: Option<u32>,
    /// Also a short-lived key.pem and cert-chain.pem made by the control plane (the seeds'
    /// machine certs), for hosts that cannot use the token at first start.
    #[arg(long)]
    pub bootstrap_certs: bool,
    /// Lifetime of the bootstrap certificate [default: the CA's].
    #[arg(long, requires = "bootstrap_certs")]
    pub cert_lifetime: Option<String>,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    #[error("{flag} {value:?} {problem}")]
    Invalid {
        flag: &'static str,
        value: String,
        problem: String,
    },
    #[error("WorkloadGroup {namespace}/{name} not found: create it first (isthmus apply -f group.yaml) or leave out --group")]
    NoGroup { namespace: String, name: String },
    #[error("--service-account {given:?} differs from WorkloadGroup {group}'s template service account {template:?}; leave it out or make them agree")]
    ServiceAccount {
        given: String,
        group: String,
        template: String,
    },
    #[error("the control plane does not know the address hosts reach it at (its gRPC port is {grpc} and it has no --advertise-ip): pass --control-plane IP[:PORT]")]
    NoAddress { grpc: SocketAddr },
    #[error("{path} already exists and is not empty: remove it or choose another --output-dir")]
    Exists { path: String },
    #[error("cannot write {path}: {cause}")]
    Write { path: String, cause: String },
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn invalid(flag: &'static str, value: &str, problem: impl Into<String>) -> VmConfigError {
    VmConfigError::Invalid {
        flag,
        value: value.to_string(),
        problem: problem.into(),
    }
}

/// `*`, empty, or a comma list of ports 1-65535, normalised (sorted, no duplicates).
pub fn parse_inbound_ports(s: &str) -> Result<String, VmConfigError> {
    let s = s.trim();
    if s == "*" || s.is_empty() {
        return Ok(s.to_string());
    }
    let mut ports = Vec::new();
    for p in s.split(',').map(str::trim) {
        let n: u16 = p.parse().ok().filter(|n| *n != 0).ok_or_else(|| {
            invalid(
                "--inbound-ports",
                s,
                format!("has {p:?}, which is not a port 1-65535 (expected e.g. 3306,8080 or *)"),
            )
        })?;
        ports.push(n);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(join_ports(&ports))
}

/// `IP` or `IP:PORT` (IPv6 as `[::1]:15012`); the port defaults to `default_port`.
pub fn parse_control_plane(s: &str, default_port: u16) -> Result<SocketAddr, VmConfigError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| {
            invalid(
                "--control-plane",
                s,
                "is not IP or IP:PORT (e.g. 10.0.0.2 or 10.0.0.2:15012); hosts' files need an address, not a name",
            )
        })
}

/// Checks every flag before anything is asked of the server.
fn validate(a: &VmConfigArgs) -> Result<(), VmConfigError> {
    if let Some(p) = dns_label_problem(&a.namespace) {
        return Err(invalid("--namespace", &a.namespace, p));
    }
    if let Some(sa) = &a.service_account {
        if let Some(p) = dns_subdomain_problem(sa) {
            return Err(invalid("--service-account", sa, p));
        }
    }
    if let Some(g) = &a.group {
        if let Some(p) = dns_subdomain_problem(g) {
            return Err(invalid("--group", g, p));
        }
    }
    if let Some(p) = &a.inbound_ports {
        parse_inbound_ports(p)?;
    }
    if let Some(cp) = &a.control_plane {
        parse_control_plane(cp, 15012)?;
    }
    humantime::parse_duration(&a.token_ttl).map_err(|e| {
        invalid(
            "--token-ttl",
            &a.token_ttl,
            format!("is not a duration like 24h: {e}"),
        )
    })?;
    if let Some(l) = &a.cert_lifetime {
        humantime::parse_duration(l).map_err(|e| {
            invalid(
                "--cert-lifetime",
                l,
                format!("is not a duration like 2h: {e}"),
            )
        })?;
    }
    if a.token_uses == Some(0) {
        return Err(invalid("--token-uses", "0", "must be at least 1"));
    }
    if let Some(dir) = &a.output_dir {
        check_output_dir(dir)?;
    }
    for (flag, p) in [("--output-dir", &a.output_dir), ("--archive", &a.archive)] {
        if let Some(p) = p {
            let parent = parent_of(p);
            if !parent.is_dir() {
                return Err(invalid(
                    flag,
                    &p.display().to_string(),
                    format!("is in {}, which is not a directory", parent.display()),
                ));
            }
        }
    }
    Ok(())
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn check_output_dir(dir: &Path) -> Result<(), VmConfigError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(VmConfigError::Exists {
                    path: dir.display().to_string(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => Err(VmConfigError::Exists {
            path: dir.display().to_string(),
        }),
    }
}

pub async fn run(a: VmConfigArgs, out: &mut dyn Write) -> Result<(), VmConfigError> {
    validate(&a)?;
    let client = Client::from_connection(&a.conn)?;
    let mesh: MeshInfo = client.json(Method::GET, "/api/v1/mesh", None).await?;

    let mut service_account = a.service_account.clone();
    let mut inbound_ports = a
        .inbound_ports
        .as_deref()
        .map(parse_inbound_ports)
        .transpose()?;
    if let Some(g) = &a.group {
        let path = format!(
            "/api/v1/namespaces/{}/workloadgroups/{}",
            enc(&a.namespace),
            enc(g)
        );
        let group = match client.json::<Resource>(Method::GET, &path, None).await {
            Ok(Resource::WorkloadGroup(g)) => g,
            Ok(_)
            | Err(ClientError::Api {
                status: reqwest::StatusCode::NOT_FOUND,
                ..
            }) => {
                return Err(VmConfigError::NoGroup {
                    namespace: a.namespace.clone(),
                    name: g.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let defaults = hostfiles::group_defaults(&group.spec.template);
        if let Some(template) = defaults.service_account {
            match &service_account {
                Some(sa) if *sa != template => {
                    return Err(VmConfigError::ServiceAccount {
                        given: sa.clone(),
                        group: format!("{}/{g}", a.namespace),
                        template,
                    })
                }
                _ => service_account = Some(template),
            }
        }
        if inbound_ports.is_none() {
            inbound_ports = Some(defaults.inbound_ports);
        }
    }
    let service_account =
        service_account.unwrap_or_else(|| isthmus_model::DEFAULT_SERVICE_ACCOUNT.to_string());

    let control_plane = match &a.control_plane {
        Some(cp) => parse_control_plane(cp, mesh.grpc_addr.port())?,
        None => hostfiles::advertised_control_plane(&mesh).ok_or(VmConfigError::NoAddress {
            grpc: mesh.grpc_addr,
        })?,
    };
    // host_dns's own warning names a port hosts' dnsmasq cannot use unprivileged; this one
    // says what the kubedns file holds and the one flag that fixes it.
    let (dns, _) = hostfiles::host_dns(&mesh, control_plane);
    if let Some(w) = dns_warning(&mesh, dns) {
        eprintln!("{w}");
    }
    let cfg = HostConfig {
        dns,
        mesh,
        namespace: a.namespace.clone(),
        service_account: service_account.clone(),
        group: a.group.clone(),
        control_plane,
        inbound_ports: inbound_ports.unwrap_or_default(),
        ip: a.ip,
    };

    let certs_req = serde_json::json!({
        "namespace": a.namespace, "serviceAccount": service_account,
        "bootstrap": a.bootstrap_certs, "lifetime": a.cert_lifetime,
    });
    let certs: Value = client
        .json(
            Method::POST,
            "/api/v1/certs",
            Some(("application/json", certs_req.to_string().into_bytes())),
        )
        .await?;
    let token_req = serde_json::json!({
        "namespace": a.namespace, "serviceAccount": service_account,
        "ttl": a.token_ttl, "uses": a.token_uses, "group": a.group,
    });
    let token: Value = client
        .json(
            Method::POST,
            "/api/v1/tokens",
            Some(("application/json", token_req.to_string().into_bytes())),
        )
        .await?;
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    let bootstrap = a
        .bootstrap_certs
        .then(|| (s(&certs, "key"), s(&certs, "certChain")));
    let files = cfg.files(
        &s(&certs, "rootCert"),
        &s(&token, "token"),
        bootstrap.as_ref().map(|(k, c)| (k.as_str(), c.as_str())),
    );

    let written = write_outputs(&a, &files);
    if let Err(e) = written {
        // Nothing was written: the token must not outlive the files it was made for.
        let id = s(&token, "id");
        let _ = client
            .send(
                Method::DELETE,
                &format!("/api/v1/tokens/{}", enc(&id)),
                None,
            )
            .await;
        return Err(e);
    }
    if let Some(dir) = &a.output_dir {
        for f in &files {
            let _ = writeln!(out, "wrote {} ({:04o})", dir.join(f.name).display(), f.mode);
        }
    }
    if let Some(archive) = &a.archive {
        let _ = writeln!(
            out,
            "wrote {} (0600, {} files)",
            archive.display(),
            files.len()
        );
    }
    let uses = token["maxUses"]
        .as_u64()
        .map_or("any number of".into(), |u| u.to_string());
    let _ = writeln!(
        out,
        "join token {} for {}: valid until {}, for {uses} certificate(s)",
        s(&token, "id"),
        s(&token, "identity"),
        crate::output::unix_time(token["expiresAt"].as_u64().unwrap_or_default()),
    );
    let _ = writeln!(
        out,
        "control plane {} (CA_ADDR), service CIDR {}, DNS {}",
        cfg.control_plane, cfg.mesh.service_cidr, cfg.dns
    );
    if cfg.control_plane.ip().is_loopback() {
        let _ = writeln!(
            out,
            "warning: CA_ADDR {} is a loopback address: only this machine reaches it; for another host pass --control-plane with an address it can reach (and run the server with --grpc-addr 0.0.0.0:15012)",
            cfg.control_plane
        );
    }
    for line in next_steps(&a, cfg.control_plane, &token) {
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

/// When hosts' `kubedns` cannot work: the mesh DNS listens on loopback only while the bundle
/// is for hosts that reach the control plane elsewhere.
pub fn dns_warning(mesh: &MeshInfo, kubedns: SocketAddr) -> Option<String> {
    let listens = mesh.dns_addr;
    if !listens.ip().is_loopback() || kubedns.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "WARNING: the mesh DNS listens on {listens} only (loopback), which other hosts cannot reach: \
         the bundle's kubedns sends mesh names to {kubedns}, where nothing answers.\n\
         fix: restart the server with --dns-addr 0.0.0.0:{port} (and open UDP/TCP {port} to the hosts), then run `isthmus vm config` again",
        port = listens.port()
    ))
}

/// What to do on the host, naming only files this run wrote: the bundle, and the token in it.
fn next_steps(a: &VmConfigArgs, control_plane: SocketAddr, token: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    let (what, token_file, extract) = match (&a.output_dir, &a.archive) {
        (Some(dir), _) => (dir.display().to_string(), dir.join("token"), None),
        (None, Some(archive)) => {
            let inside = PathBuf::from(archive_base(archive)).join("token");
            let extract = format!("tar -xzf {} {} && ", archive.display(), inside.display());
            (archive.display().to_string(), inside, Some(extract))
        }
        (None, None) => return lines,
    };
    lines.push(format!("next, on the host: isthmus join {what}"));
    if let Some(pins) = token["rootHashes"].as_array().filter(|p| !p.is_empty()) {
        let pins: Vec<&str> = pins.iter().filter_map(Value::as_str).collect();
        lines.push(format!(
            "(or, with only the token: {}isthmus join --server {control_plane} --token @{}; it pins the root {})",
            extract.unwrap_or_default(),
            token_file.display(),
            pins.join(", ")
        ));
    }
    lines
}

fn write_outputs(a: &VmConfigArgs, files: &[BundleFile]) -> Result<(), VmConfigError> {
    let archive = match &a.archive {
        Some(p) => Some((p, make_archive(p, files)?)),
        None => None,
    };
    if let Some(dir) = &a.output_dir {
        write_dir(dir, files)?;
    }
    if let Some((path, bytes)) = archive {
        if let Err(e) = isthmus_control_plane::server::write_atomic(path, &bytes, 0o600) {
            if let Some(dir) = &a.output_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(VmConfigError::Write {
                path: path.display().to_string(),
                cause: e.to_string(),
            });
        }
    }
    Ok(())
}

/// Writes the files into a temporary directory beside `dir` (mode 0700: it holds the token)
/// and renames it into place.
fn write_dir(dir: &Path, files: &[BundleFile]) -> Result<(), VmConfigError> {
    let werr = |p: &Path, e: std::io::Error| VmConfigError::Write {
        path: p.display().to_string(),
        cause: e.to_string(),
    };
    let parent = parent_of(dir);
    let tmp = tempfile::Builder::new()
        .prefix(".isthmus-vm-config-")
        .tempdir_in(&parent)
        .map_err(|e| werr(&parent, e))?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| werr(dir, e))?;
    for f in files {
        let path = tmp.path().join(f.name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(f.mode)
            .open(&path)
            .map_err(|e| werr(&dir.join(f.name), e))?;
        file.write_all(&f.contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| werr(&dir.join(f.name), e))?;
    }
    // An empty directory in the way is replaced (rename(2) allows it); a non-empty one is not.
    std::fs::rename(tmp.path(), dir).map_err(|e| werr(dir, e))?;
    let _ = tmp.keep();
    Ok(())
}

/// The directory the archive holds its files under: its name without `.tar.gz`/`.tgz`.
fn archive_base(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let base = name.trim_end_matches(".tar.gz").trim_end_matches(".tgz");
    if base.is_empty() {
        "isthmus-host".to_string()
    } else {
        base.to_string()
    }
}

/// The bundle as a gzipped tar, under a directory named after the archive.
pub fn make_archive(path: &Path, files: &[BundleFile]) -> Result<Vec<u8>, VmConfigError> {
    let base = archive_base(path);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let err = |e: std::io::Error| VmConfigError::Write {
        path: path.display().to_string(),
        cause: e.to_string(),
    };
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o700);
    dir.set_mtime(now);
    dir.set_size(0);
    tar.append_data(&mut dir, format!("{base}/"), std::io::empty())
        .map_err(err)?;
    for f in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(f.mode);
        h.set_mtime(now);
        h.set_size(f.contents.len() as u64);
        tar.append_data(&mut h, format!("{base}/{}", f.name), f.contents.as_slice())
            .map_err(err)?;
    }
    tar.into_inner().and_then(|gz| gz.finish()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_ports_are_checked_and_normalised() {
        assert_eq!(parse_inbound_ports("8080, 3306,8080").unwrap(), "3306,8080");
        assert_eq!(parse_inbound_ports("*").unwrap(), "*");
        assert_eq!(parse_inbound_ports("").unwrap(), "");
        let e = parse_inbound_ports("80,http").unwrap_err().to_string();
        assert!(e.contains("\"http\""), "{e}");
        assert!(parse_inbound_ports("0").is_err());
    }

    #[test]
    fn control_plane_address_forms() {
        assert_eq!(
            parse_control_plane("10.0.0.2", 15012).unwrap(),
            "10.0.0.2:15012".parse().unwrap()
        );
        assert_eq!(
            parse_control_plane("10.0.0.2:1234", 15012).unwrap(),
            "10.0.0.2:1234".parse().unwrap()
        );
        assert_eq!(
            parse_control_plane("fd00::1", 15012).unwrap(),
            "[fd00::1]:15012".parse().unwrap()
        );
        assert!(parse_control_plane("istiod", 15012).is_err());
    }

    fn mesh(dns: &str) -> MeshInfo {
        MeshInfo {
            trust_domain: "cluster.local".into(),
            domain: "cluster.local".into(),
            service_cidr: "10.96.0.0/12".into(),
            advertised_ips: vec!["10.0.0.2".parse().unwrap()],
            public_addrs: Vec::new(),
            grpc_addr: "0.0.0.0:15012".parse().unwrap(),
            dns_addr: dns.parse().unwrap(),
            ca_server_name: "istiod.istio-system.svc".into(),
        }
    }

    #[test]
    fn loopback_only_dns_is_said_loudly_with_the_fix() {
        let w = dns_warning(&mesh("127.0.0.1:15054"), "10.0.0.2:15054".parse().unwrap()).unwrap();
        assert_eq!(
            w,
            "WARNING: the mesh DNS listens on 127.0.0.1:15054 only (loopback), which other hosts cannot reach: \
             the bundle's kubedns sends mesh names to 10.0.0.2:15054, where nothing answers.\n\
             fix: restart the server with --dns-addr 0.0.0.0:15054 (and open UDP/TCP 15054 to the hosts), then run `isthmus vm config` again"
        );
        // Reachable DNS, or a bundle for this machine only: nothing to say.
        assert_eq!(
            dns_warning(&mesh("0.0.0.0:15054"), "10.0.0.2:15054".parse().unwrap()),
            None
        );
        assert_eq!(
            dns_warning(&mesh("127.0.0.1:15054"), "127.0.0.1:15054".parse().unwrap()),
            None
        );
    }

    fn args_for(out: Option<&str>, archive: Option<&str>) -> VmConfigArgs {
        VmConfigArgs {
            namespace: "onprem".into(),
            service_account: None,
            group: None,
            output_dir: out.map(PathBuf::from),
            archive: archive.map(PathBuf::from),
            control_plane: None,
            inbound_ports: None,
            ip: None,
            token_ttl: "24h".into(),
            token_uses: None,
            bootstrap_certs: false,
            cert_lifetime: None,
            conn: Connection::default(),
        }
    }

    #[test]
    fn next_steps_name_only_files_that_were_written() {
        let cp = "10.0.0.2:15012".parse().unwrap();
        let token = serde_json::json!({"rootHashes": ["sha256:ab"]});
        assert_eq!(
            next_steps(&args_for(Some("./mysql-vm"), None), cp, &token),
            [
                "next, on the host: isthmus join ./mysql-vm",
                "(or, with only the token: isthmus join --server 10.0.0.2:15012 --token @./mysql-vm/token; it pins the root sha256:ab)",
            ]
        );
        assert_eq!(
            next_steps(&args_for(None, Some("out/mysql-vm.tar.gz")), cp, &token),
            [
                "next, on the host: isthmus join out/mysql-vm.tar.gz",
                "(or, with only the token: tar -xzf out/mysql-vm.tar.gz mysql-vm/token && isthmus join --server 10.0.0.2:15012 --token @mysql-vm/token; it pins the root sha256:ab)",
            ]
        );
        assert_eq!(
            next_steps(
                &args_for(Some("d"), Some("d.tar.gz")),
                cp,
                &serde_json::json!({})
            )[0],
            "next, on the host: isthmus join d"
        );
    }
}
