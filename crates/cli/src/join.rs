//! `isthmus join`: installs a host's files from `isthmus vm config` (or, with `--server`, the same
//! files fetched from the control plane with a join token, `crate::onboard`) at the paths of
//! docs/host-layout.md and starts the agent. The control plane is checked first (reachable, and
//! its certificate chains to the bundle's root), so a wrong bundle changes nothing. Each step
//! prints one line (`ok`, `skip` or `FAIL`); re-running gives the same result.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use isthmus_control_plane::hostfiles::{
    AGENT_ENV, CERT_CHAIN, CLUSTER_ENV, HOSTS, KEY, KUBEDNS, REQUIRED, ROOT_CERT, SIDECAR_ENV,
    TOKEN,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use isthmus_agent_config::{AgentEnv, CaAddr, AGENT_ENV_PATH};

use crate::tlsverify::RecordingVerifier;

/// The proxy's user and group (the uid the interception rules exempt, as in Istio).
pub const PROXY_USER: &str = "istio-proxy";
pub const PROXY_ID: u32 = 1337;
pub const AGENT_UNIT: &str = "isthmus-agent.service";
const HOSTS_MARK: &str = "# isthmus";
/// No file of a bundle is anywhere near this; a bigger archive entry is refused.
pub(crate) const MAX_FILE: u64 = 1 << 20;

#[derive(clap::Args, Debug, Clone)]
pub struct JoinArgs {
    /// A directory or a .tar.gz written by `isthmus vm config`.
    #[arg(
        required_unless_present = "server",
        conflicts_with_all = ["server", "token", "root_hash"]
    )]
    pub source: Option<PathBuf>,
    /// Fetch the bundle from the control plane's gRPC port instead (HOST or HOST:PORT, port
    /// 15012 by default), with a join token; the control plane must serve a pinned root.
    #[arg(long, value_name = "HOST:PORT", requires = "token")]
    pub server: Option<String>,
    /// With --server: the join token, or @FILE to read it from FILE (keeps it out of `ps`).
    #[arg(long, value_name = "TOKEN|@FILE", requires = "server")]
    pub token: Option<String>,
    /// With --server: the root the control plane must serve, `sha256:<hex>` of its DER
    /// (repeatable; any one may match). Replaces the pins the join token carries. `isthmus token
    /// create` prints it; from a root file: `openssl x509 -in root-cert.pem -outform der |
    /// sha256sum`.
    #[arg(long = "root-hash", value_name = "sha256:HEX", requires = "server")]
    pub root_hash: Vec<String>,
    /// Put every path under this directory instead of `/` (tests, images being built). No user
    /// is created outside it and no service is started.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Install only: do not enable and start isthmus-agent.service.
    #[arg(long)]
    pub no_start: bool,
    /// How long to wait for the control plane's gRPC port.
    #[arg(long, default_value = "5s")]
    pub timeout: humantime::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("join failed: {0}")]
    Failed(String),
}

/// A bundle read into memory: file name → contents.
#[derive(Debug, Default)]
pub struct Bundle {
    pub files: BTreeMap<String, Vec<u8>>,
}

/// One installed file: where it goes under the host's root, its mode, and whether the proxy's
/// user owns it.
struct Install {
    name: &'static str,
    path: &'static str,
    mode: u32,
    proxy_owned: bool,
}

const INSTALLS: [Install; 8] = [
    Install {
        name: AGENT_ENV,
        path: "/etc/isthmus/agent.env",
        mode: 0o644,
        proxy_owned: false,
    },
    Install {
        name: TOKEN,
        path: "/etc/isthmus/token",
        mode: 0o600,
        proxy_owned: true,
    },
    Install {
        name: CLUSTER_ENV,
        path: "/var/lib/istio/envoy/cluster.env",
        mode: 0o644,
        proxy_owned: false,
    },
    Install {
        name: SIDECAR_ENV,
        path: "/var/lib/istio/envoy/sidecar.env",
        mode: 0o644,
        proxy_owned: false,
    },
    Install {
        name: ROOT_CERT,
        path: "/etc/certs/root-cert.pem",
        mode: 0o644,
        proxy_owned: false,
    },
    Install {
        name: KEY,
        path: "/etc/certs/key.pem",
        mode: 0o600,
        proxy_owned: true,
    },
    Install {
        name: CERT_CHAIN,
        path: "/etc/certs/cert-chain.pem",
        mode: 0o644,
        proxy_owned: true,
    },
    Install {
        name: KUBEDNS,
        path: "/etc/dnsmasq.d/kubedns",
        mode: 0o644,
        proxy_owned: false,
    },
];

/// Directories: path, mode, owned by the proxy's user (the agent writes there).
const DIRS: [(&str, u32, bool); 4] = [
    ("/etc/isthmus", 0o755, false),
    ("/var/lib/istio/envoy", 0o755, false),
    ("/etc/certs", 0o755, true),
    ("/var/lib/isthmus", 0o750, true),
];

pub(crate) struct Report<'a> {
    out: &'a mut dyn Write,
    failed: Option<String>,
}

impl Report<'_> {
    fn line(&mut self, status: &str, what: &str) {
        let _ = writeln!(self.out, "{status:<4} {what}");
        let _ = self.out.flush();
    }
    pub(crate) fn ok(&mut self, what: impl AsRef<str>) {
        self.line("ok", what.as_ref());
    }
    pub(crate) fn skip(&mut self, what: impl AsRef<str>) {
        self.line("skip", what.as_ref());
    }
    pub(crate) fn fail(&mut self, what: impl AsRef<str>) -> JoinError {
        self.line("FAIL", what.as_ref());
        self.failed = Some(what.as_ref().to_string());
        JoinError::Failed(what.as_ref().lines().next().unwrap_or_default().to_string())
    }
}

pub async fn run(a: JoinArgs, out: &mut dyn Write) -> Result<(), JoinError> {
    let mut r = Report { out, failed: None };
    // useradd --root and the printed paths want it absolute.
    // A missing --root is made once the checks passed, so a failed join leaves nothing.
    let (root, make_root) = match &a.root {
        Some(d) => match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => match std::fs::canonicalize(d) {
                Ok(d) => (Some(d), false),
                Err(e) => return Err(r.fail(format!("--root {}: {e}", d.display()))),
            },
            Ok(_) => {
                return Err(r.fail(format!(
                    "--root {}: exists and is not a directory",
                    d.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let abs = std::env::current_dir()
                    .map(|cwd| cwd.join(d))
                    .unwrap_or_else(|_| d.clone());
                (Some(abs), true)
            }
            Err(e) => return Err(r.fail(format!("--root {}: {e}", d.display()))),
        },
        None => (None, false),
    };
    let at = |p: &str| host_path(root.as_deref(), p);

    // 1. The bundle, whole, before anything else.
    let bundle = match (&a.server, &a.source) {
        (Some(server), _) => {
            let pins = crate::onboard::Pins {
                token: a.token.as_deref().unwrap_or_default(),
                root_hashes: &a.root_hash,
            };
            crate::onboard::fetch_bundle(server, pins, a.timeout.into(), &mut r).await?
        }
        (None, Some(source)) => match read_bundle(source) {
            Ok(b) => {
                r.ok(format!(
                    "read the bundle {} ({} files)",
                    source.display(),
                    b.files.len()
                ));
                b
            }
            Err(e) => return Err(r.fail(format!("read the bundle {}: {e}", source.display()))),
        },
        (None, None) => {
            return Err(r.fail(
                "nothing to join: give a directory or .tar.gz from `isthmus vm config`, or --server HOST:PORT --token TOKEN",
            ))
        }
    };
    let settings = match isthmus_intercept::EnvFile::parse_bytes(AGENT_ENV, &bundle.files[AGENT_ENV])
        .map_err(|e| e.to_string())
        .and_then(|env| {
            AgentEnv::parse(&env).map_err(|errs| {
                errs.iter()
                    .map(|e| format!("{e} ({})", e.fix()))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        }) {
        Ok(s) => s,
        Err(e) => {
            return Err(r.fail(format!(
                "read {AGENT_ENV} from the bundle: {e}; write the bundle again with `isthmus vm config`"
            )))
        }
    };
    let ca_addr = settings.ca_addr.clone();
    let server_name = settings.ca_server_name.clone();

    // 2. The control plane: reachable, and the one whose root the bundle carries; and the
    // bundle's token still good there (fetched bundles had theirs checked already).
    match check_control_plane(
        &ca_addr,
        &server_name,
        &bundle.files[ROOT_CERT],
        a.timeout.into(),
    )
    .await
    {
        Ok((addr, roots)) => {
            r.ok(format!(
                "control plane at {} is reachable and its certificate ({server_name}) chains to the bundle's root-cert.pem",
                ca_addr.authority()
            ));
            if a.server.is_none() {
                let token = String::from_utf8_lossy(&bundle.files[TOKEN]).to_string();
                match crate::onboard::check_token(addr, &server_name, &roots, &token, a.timeout.into()).await {
                    Ok(Some((identity, id))) => r.ok(format!(
                        "the bundle's join token {id} for {identity} is valid (checked with the control plane, no use spent)"
                    )),
                    Ok(None) => r.skip(
                        "check the bundle's join token: the control plane has no onboarding API (an older `isthmus server`); the agent will find out",
                    ),
                    Err(e) => return Err(r.fail(e)),
                }
            }
        }
        Err(e) => return Err(r.fail(e)),
    }
    if let (Some(dir), true) = (&root, make_root) {
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
        {
            Ok(()) => r.ok(format!("created --root {}", dir.display())),
            Err(e) => return Err(r.fail(format!("create --root {}: {e}", dir.display()))),
        }
    }

    // 3. The proxy's user and group.
    let ids = match ensure_user(root.as_deref(), &mut r) {
        Ok(ids) => ids,
        Err(e) => return Err(r.fail(e)),
    };
    let is_root = nix::unistd::geteuid().is_root();
    let chown_to = ids.filter(|_| is_root);
    if ids.is_some() && !is_root {
        r.skip(format!(
            "give {PROXY_USER} its files (chown): not running as root"
        ));
    }

    // 4. Directories and files.
    for (dir, mode, proxy_owned) in DIRS {
        let path = at(dir);
        let owner = if proxy_owned { chown_to } else { None };
        if let Err(e) = ensure_dir(&path, mode, owner) {
            return Err(r.fail(format!("create {}: {e}", path.display())));
        }
        r.ok(format!(
            "directory {} ({mode:04o}{})",
            path.display(),
            owner_note(proxy_owned, owner)
        ));
    }
    let dnsmasq = at("/etc/dnsmasq.d");
    for f in INSTALLS {
        let Some(contents) = bundle.files.get(f.name) else {
            continue;
        };
        let path = at(f.path);
        if f.name == KUBEDNS && !dnsmasq.is_dir() {
            r.skip(format!(
                "{}: dnsmasq is not installed ({} does not exist)",
                path.display(),
                dnsmasq.display()
            ));
            continue;
        }
        let mut contents = contents.clone();
        if f.name == CLUSTER_ENV {
            if let Some((uid, gid)) = ids.filter(|(u, g)| (*u, *g) != (PROXY_ID, PROXY_ID)) {
                // 1337 was taken: the rules must exempt the ids the proxy really runs as.
                contents.extend_from_slice(
                    format!("ISTHMUS_PROXY_UID={uid}\nISTHMUS_PROXY_GID={gid}\n").as_bytes(),
                );
            }
        }
        let owner = if f.proxy_owned { chown_to } else { None };
        match install_file(&path, &contents, f.mode, owner) {
            Ok(changed) => r.ok(format!(
                "{} ({:04o}{}){}",
                path.display(),
                f.mode,
                owner_note(f.proxy_owned, owner),
                if changed { "" } else { ", unchanged" }
            )),
            Err(e) => return Err(r.fail(format!("write {}: {e}", path.display()))),
        }
    }

    // 5. /etc/hosts: our lines replaced, never duplicated.
    let hosts = at("/etc/hosts");
    match update_hosts(&hosts, &String::from_utf8_lossy(&bundle.files[HOSTS])) {
        Ok(true) => r.ok(format!("{}: control-plane names added", hosts.display())),
        Ok(false) => r.ok(format!(
            "{}: control-plane names already there",
            hosts.display()
        )),
        Err(e) => return Err(r.fail(format!("update {}: {e}", hosts.display()))),
    }

    // 6. The agent.
    let command = agent_command(root.as_deref(), ids.is_some(), &settings);
    if a.no_start {
        r.skip(format!(
            "start the agent (--no-start); to run it: {command}"
        ));
    } else if root.is_some() {
        r.skip(format!(
            "start the agent (--root given); to run it: {command}"
        ));
    } else if !Path::new("/run/systemd/system").exists() {
        r.skip(format!(
            "start the agent: systemd is not running; run it with: {command}"
        ));
    } else if !unit_installed() {
        r.skip(format!(
            "start the agent: {AGENT_UNIT} is not installed (install the package); run it with: {command}"
        ));
    } else {
        match Command::new("systemctl")
            .args(["enable", "--now", AGENT_UNIT])
            .output()
        {
            Ok(o) if o.status.success() => r.ok(format!("{AGENT_UNIT} enabled and started")),
            Ok(o) => {
                return Err(r.fail(format!(
                    "systemctl enable --now {AGENT_UNIT}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )))
            }
            Err(e) => return Err(r.fail(format!("run systemctl: {e}"))),
        }
    }
    match r.failed {
        Some(f) => Err(JoinError::Failed(f)),
        None => Ok(()),
    }
}

fn owner_note(proxy_owned: bool, owner: Option<(u32, u32)>) -> &'static str {
    match (proxy_owned, owner) {
        (true, Some(_)) => ", istio-proxy",
        (true, None) => ", owner unchanged",
        (false, _) => "",
    }
}

/// `p` (an absolute host path) under `root`.
pub fn host_path(root: Option<&Path>, p: &str) -> PathBuf {
    match root {
        Some(r) => r.join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    }
}

/// Reads a directory or a .tar.gz (files at its top or one directory down).
pub fn read_bundle(source: &Path) -> Result<Bundle, String> {
    let mut bundle = Bundle::default();
    let meta = std::fs::metadata(source).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        for name in REQUIRED.iter().chain([KEY, CERT_CHAIN].iter()) {
            match std::fs::read(source.join(name)) {
                Ok(b) => {
                    bundle.files.insert((*name).to_string(), b);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{name}: {e}")),
            }
        }
    } else {
        let file = std::fs::File::open(source).map_err(|e| e.to_string())?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let entries = tar
            .entries()
            .map_err(|e| format!("not a .tar.gz from `isthmus vm config`: {e}"))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| format!("not a .tar.gz from `isthmus vm config`: {e}"))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path().map_err(|e| e.to_string())?.to_path_buf();
            let depth = path.components().count();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(known_file)
            else {
                continue;
            };
            if depth > 2 {
                continue;
            }
            if entry.size() > MAX_FILE {
                return Err(format!("{name} in the archive is larger than 1 MiB"));
            }
            let mut buf = Vec::new();
            entry
                .by_ref()
                .take(MAX_FILE)
                .read_to_end(&mut buf)
                .map_err(|e| format!("{name}: {e}"))?;
            bundle.files.insert(name.to_string(), buf);
        }
    }
    bundle.check(" (is it a directory or archive from `isthmus vm config`?)")?;
    Ok(bundle)
}

/// The name of a file bundles may hold, as the constant.
pub(crate) fn known_file(name: &str) -> Option<&'static str> {
    REQUIRED
        .iter()
        .chain([KEY, CERT_CHAIN].iter())
        .find(|k| **k == name)
        .copied()
}

impl Bundle {
    /// Every required file there, the bootstrap pair whole; `hint` ends the "missing" message.
    pub(crate) fn check(&self, hint: &str) -> Result<(), String> {
        let missing: Vec<&str> = REQUIRED
            .iter()
            .filter(|n| !self.files.contains_key(**n))
            .copied()
            .collect();
        if !missing.is_empty() {
            return Err(format!("{} missing{hint}", missing.join(", ")));
        }
        if self.files.contains_key(KEY) != self.files.contains_key(CERT_CHAIN) {
            return Err("key.pem and cert-chain.pem come together; one is missing".into());
        }
        Ok(())
    }
}

/// Subject and key id of a certificate, or of its issuer, for messages.
pub(crate) fn describe(der: &[u8], issuer: bool) -> String {
    use x509_parser::extensions::ParsedExtension;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return "an unparsable certificate".into();
    };
    let name = if issuer {
        cert.issuer()
    } else {
        cert.subject()
    };
    let mut key_id = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) if issuer => {
                key_id = aki.key_identifier.as_ref().map(|k| hex(k.0));
            }
            ParsedExtension::SubjectKeyIdentifier(ski) if !issuer => key_id = Some(hex(ski.0)),
            _ => {}
        }
    }
    match key_id {
        Some(k) => format!("\"{name}\" (key id {k})"),
        None => format!("\"{name}\""),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Connects to CA_ADDR and completes a TLS handshake trusting only the bundle's roots.
async fn check_control_plane(
    ca_addr: &CaAddr,
    server_name: &str,
    roots_pem: &[u8],
    timeout: Duration,
) -> Result<(SocketAddr, Vec<CertificateDer<'static>>), String> {
    let authority = ca_addr.authority();
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!("check the control plane: the bundle's root-cert.pem is not PEM: {e}")
        })?;
    if roots.is_empty() {
        return Err(
            "check the control plane: the bundle's root-cert.pem holds no certificate".into(),
        );
    }
    let verifier = RecordingVerifier::enforcing(&roots)
        .map_err(|e| format!("check the control plane: root-cert.pem: {e}"))?;
    let config = verifier
        .client_config()
        .map_err(|e| format!("check the control plane: {e}"))?;
    let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
        format!("check the control plane: ISTHMUS_CA_SERVER_NAME {server_name:?} is not a DNS name")
    })?;

    let unreachable = |e: String| {
        format!("control plane at {authority} (CA_ADDR in agent.env) is unreachable: {e}; is `isthmus server` running there, and its gRPC port open to this host?")
    };
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(timeout, tokio::net::lookup_host(authority.as_str()))
            .await
            .map_err(|_| unreachable("name lookup timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| unreachable("no address".into()))?;
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            unreachable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| {
            crate::onboard::not_tls_message(
                &format!("control plane at {authority} (CA_ADDR in agent.env)"),
                "no TLS answer within the time limit",
            )
        })?;
    match handshake {
        Ok(_) => Ok((addr, roots)),
        Err(e) => {
            let seen = verifier.seen().map(|s| s.chain).unwrap_or_default();
            let bundle_roots = roots
                .iter()
                .map(|r| describe(r, false))
                .collect::<Vec<_>>()
                .join(", ");
            Err(match seen.first() {
                Some(leaf) => format!(
                    "control plane at {authority} presents a certificate issued by {}, which does not chain to the bundle's root-cert.pem ({bundle_roots}): this bundle is for another control plane, or its root changed; make a new one with `isthmus vm config` ({e})",
                    describe(leaf, true)
                ),
                None if crate::onboard::not_tls(&e) => {
                    crate::onboard::not_tls_message(&format!("control plane at {authority} (CA_ADDR in agent.env)"), &e.to_string())
                }
                None => format!("control plane at {authority}: TLS handshake failed: {e}"),
            })
        }
    }
}

/// uid and gid of a name in a passwd- or group-style file.
fn lookup_id(file: &Path, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() >= 3).then(|| {
            let id = f[2].parse().unwrap_or(u32::MAX);
            let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            (id, gid)
        })
    })
}

fn id_taken(file: &Path, id: u32) -> bool {
    std::fs::read_to_string(file).is_ok_and(|t| {
        t.lines()
            .any(|l| l.split(':').nth(2).and_then(|v| v.parse::<u32>().ok()) == Some(id))
    })
}

/// Makes sure `istio-proxy` exists; returns its (uid, gid), or None when it could not be made
/// (a printed note says why and what to run).
fn ensure_user(root: Option<&Path>, r: &mut Report<'_>) -> Result<Option<(u32, u32)>, String> {
    let passwd = host_path(root, "/etc/passwd");
    let group = host_path(root, "/etc/group");
    let found = || -> Option<(u32, u32)> {
        let uid = lookup_id(&passwd, PROXY_USER)?.0;
        let gid = lookup_id(&group, PROXY_USER)?.0;
        Some((uid, gid))
    };
    if let Some((uid, gid)) = found() {
        r.ok(format!(
            "user and group {PROXY_USER} exist (uid {uid}, gid {gid})"
        ));
        return Ok(Some((uid, gid)));
    }
    let root_flag: Vec<String> = root
        .map(|d| vec!["--root".to_string(), d.display().to_string()])
        .unwrap_or_default();
    let gid_flag = if id_taken(&group, PROXY_ID) {
        String::new()
    } else {
        format!("--gid {PROXY_ID} ")
    };
    let uid_flag = if id_taken(&passwd, PROXY_ID) {
        String::new()
    } else {
        format!("--uid {PROXY_ID} ")
    };
    let manual = format!(
        "groupadd --system {gid_flag}{PROXY_USER} && useradd --system {uid_flag}--gid {PROXY_USER} --home-dir /var/lib/isthmus --no-create-home --shell /usr/sbin/nologin {PROXY_USER}"
    );
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_string())
    } else if !passwd.is_file() || !group.is_file() {
        Some(format!(
            "{} or {} does not exist",
            passwd.display(),
            group.display()
        ))
    } else if !["groupadd", "useradd"].iter().all(|c| on_path(c)) {
        Some("groupadd/useradd are not installed".into())
    } else {
        None
    };
    if let Some(why) = why {
        r.skip(format!(
            "create user {PROXY_USER}: {why}; as root run: {manual}"
        ));
        return Ok(None);
    }
    if lookup_id(&group, PROXY_USER).is_none() {
        let mut cmd = Command::new("groupadd");
        cmd.args(&root_flag).arg("--system");
        if !gid_flag.is_empty() {
            cmd.args(["--gid", &PROXY_ID.to_string()]);
        }
        run_tool(cmd.arg(PROXY_USER), "groupadd")?;
    }
    if lookup_id(&passwd, PROXY_USER).is_none() {
        let mut cmd = Command::new("useradd");
        cmd.args(&root_flag).arg("--system");
        if !uid_flag.is_empty() {
            cmd.args(["--uid", &PROXY_ID.to_string()]);
        }
        cmd.args([
            "--gid",
            PROXY_USER,
            "--home-dir",
            "/var/lib/isthmus",
            "--no-create-home",
        ])
        .args(["--shell", "/usr/sbin/nologin", PROXY_USER]);
        run_tool(&mut cmd, "useradd")?;
    }
    match found() {
        Some((uid, gid)) => {
            let note = if (uid, gid) == (PROXY_ID, PROXY_ID) {
                String::new()
            } else {
                format!("; {PROXY_ID} was taken, so cluster.env gets ISTHMUS_PROXY_UID/GID")
            };
            r.ok(format!(
                "created user and group {PROXY_USER} (uid {uid}, gid {gid}){note}"
            ));
            Ok(Some((uid, gid)))
        }
        None => Err(format!(
            "create user {PROXY_USER}: useradd succeeded but {} has no {PROXY_USER}",
            passwd.display()
        )),
    }
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "create user {PROXY_USER}: {what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("create user {PROXY_USER}: cannot run {what}: {e}")),
    }
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .any(|d| d.join(cmd).is_file())
    })
}

fn ensure_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g))?;
    }
    Ok(())
}

/// Writes `contents` atomically with `mode` (and owner); false when it was already so.
fn install_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<bool> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    let same = std::fs::read(path).is_ok_and(|old| old == contents)
        && std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if !same {
        isthmus_control_plane::server::write_atomic(path, contents, mode)?;
    }
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g))?;
    }
    Ok(!same)
}

/// Replaces the lines ending in `# isthmus` with the bundle's; true when the file changed.
fn update_hosts(path: &Path, bundle_hosts: &str) -> std::io::Result<bool> {
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut new: String = old
        .lines()
        .filter(|l| !l.trim_end().ends_with(HOSTS_MARK))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut added = Vec::new();
    for l in bundle_hosts
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let line = format!("{l} {HOSTS_MARK}\n");
        if !added.contains(&line) {
            new.push_str(&line);
            added.push(line);
        }
    }
    if new == old {
        return Ok(false);
    }
    let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    // /etc/hosts may be a bind mount (containers), where rename fails: write it in place then.
    if isthmus_control_plane::server::write_atomic(path, new.as_bytes(), mode).is_err() {
        std::fs::write(path, new.as_bytes())?;
    }
    Ok(true)
}

fn unit_installed() -> bool {
    Command::new("systemctl")
        .args(["cat", AGENT_UNIT])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The command that runs the agent as the unit would: agent.env as its environment, as
/// istio-proxy with the capability the interception rules need. For an install under --root,
/// the settings are given on the command line with their paths under that root.
fn agent_command(root: Option<&Path>, have_user: bool, settings: &AgentEnv) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/usr/bin/isthmus".into());
    let run = if have_user {
        format!("setpriv --reuid={PROXY_USER} --regid={PROXY_USER} --init-groups --inh-caps=+net_admin,+net_raw --ambient-caps=+net_admin,+net_raw {exe} agent")
    } else {
        format!("{exe} agent")
    };
    match root {
        None => format!("sudo sh -c 'set -a; . {AGENT_ENV_PATH}; exec {run}'"),
        Some(root) => {
            let env = settings
                .under_root(root)
                .assignments()
                .into_iter()
                .map(|(k, v)| format!("{k}={}", shell_quote(&v)))
                .collect::<Vec<_>>()
                .join(" ");
            format!("sudo env {env} {run}")
        }
    }
}

/// A word the shell reads back as `s`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+[]".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
