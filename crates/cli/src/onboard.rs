//! `isthmus join --server ADDR --token TOKEN`: the host's bundle from the control plane's
//! onboarding API, trusting only a root pinned by hash (as kubeadm's
//! `--discovery-token-ca-cert-hash`):
//! 1. the pins come from `--root-hash`, else from the join token's `root` claim (read without
//!    verifying it: the host has no key to; the token came from the operator like a pin would);
//! 2. the trust bundle is read over a connection that trusts nothing and carries nothing secret;
//!    one of its roots must match a pin;
//! 3. a second connection verifies the control plane's certificate against the matching roots
//!    and the name hosts check (istiod.istio-system.svc), and only then is the token sent, for
//!    the bundle (the control plane checks it as for a certificate but spends no use).
//!
//! The files then go through the same checks and installation as a bundle read from disk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use isthmus_control_plane::api::CA_SERVER_NAME;
use isthmus_control_plane::hostfiles::{ROOT_CERT, TOKEN};
use isthmus_control_plane::onboarding::pb::onboarding_client::OnboardingClient;
use isthmus_control_plane::onboarding::pb::{GetBundleRequest, GetTrustBundleRequest};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::join::{describe, known_file, Bundle, JoinError, Report, MAX_FILE};
use crate::tlsverify::RecordingVerifier;

/// The control plane's gRPC port, when `--server` names none.
pub const DEFAULT_PORT: u16 = 15012;

/// What the host was given: the token (or `@FILE`) and the `--root-hash` values.
#[derive(Clone, Copy, Debug)]
pub struct Pins<'a> {
    pub token: &'a str,
    pub root_hashes: &'a [String],
}

/// Why a connection was not made.
enum ConnectError {
    Unreachable(String),
    Handshake(String),
    /// The port answered, but not with TLS (or not at all): another service's port.
    NotTls(String),
}

/// Fetches and checks the bundle, one report line per step; on failure the line says why and
/// nothing has been written.
pub async fn fetch_bundle(
    server: &str,
    given: Pins<'_>,
    timeout: Duration,
    r: &mut Report<'_>,
) -> Result<Bundle, JoinError> {
    // 1. The token and the pins.
    let token = read_token(given.token).map_err(|e| r.fail(format!("read the join token: {e}")))?;
    let claims = isthmus_ca::claims_unverified(&token);
    let (pins, from) = if given.root_hashes.is_empty() {
        let claims = claims.as_ref().map_err(|e| {
            r.fail(format!(
                "read the join token: {e}; is it the token `isthmus token create` printed? (no root to pin without one: --root-hash)"
            ))
        })?;
        if claims.root.is_empty() {
            return Err(r.fail(format!(
                "no root to pin: join token {} carries no root hash (an older control plane made it) and no --root-hash was given; pass --root-hash sha256:<hex> (`isthmus token create` prints it; or `openssl x509 -in root-cert.pem -outform der | sha256sum`)",
                claims.jti
            )));
        }
        let pins: Result<Vec<String>, _> = claims
            .root
            .iter()
            .map(|h| isthmus_ca::parse_root_hash(h))
            .collect();
        let pins = pins.map_err(|e| r.fail(format!("the join token's root claim: {e}")))?;
        (pins, "from the join token")
    } else {
        let pins: Result<Vec<String>, _> = given
            .root_hashes
            .iter()
            .map(|h| isthmus_ca::parse_root_hash(h))
            .collect();
        (
            pins.map_err(|e| r.fail(format!("--root-hash: {e}")))?,
            "from --root-hash",
        )
    };
    let pin_list = pins.join(", ");
    match &claims {
        Ok(c) => r.ok(format!(
            "join token {} for {}{}; pinned root {pin_list} ({from})",
            c.jti,
            c.sub,
            c.group
                .as_ref()
                .map(|g| format!(" (WorkloadGroup {g})"))
                .unwrap_or_default(),
        )),
        // The control plane will say what is wrong with it.
        Err(_) => r.skip(format!(
            "read the join token: not a JWT this host can read; pinned root {pin_list} ({from})"
        )),
    }

    // 2. The roots, over a connection that trusts nothing, and one of them pinned.
    let addr = resolve(server, timeout)
        .await
        .map_err(|e| r.fail(unreachable(server, &e)))?;
    let probe = RecordingVerifier::trusting_nothing();
    let channel = connect(addr, &probe, timeout)
        .await
        .map_err(|e| r.fail(connect_message(server, e)))?;
    let roots_pem = OnboardingClient::new(channel)
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .map_err(|s| r.fail(status_message(server, &s, "read its trust bundle")))?
        .into_inner()
        .roots_pem;
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            r.fail(format!(
                "control plane at {server} serves a trust bundle that is not PEM: {e}"
            ))
        })?;
    let pinned: Vec<CertificateDer<'static>> = roots
        .iter()
        .filter(|c| pins.contains(&isthmus_ca::root_hash(c)))
        .cloned()
        .collect();
    if pinned.is_empty() {
        let seen = if roots.is_empty() {
            "no root at all".to_string()
        } else {
            roots
                .iter()
                .map(|c| format!("{} {}", isthmus_ca::root_hash(c), describe(c, false)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(r.fail(format!(
            "root hash mismatch: the control plane at {server} serves {seen}, but the pinned root is {pin_list} ({from}): this is not the control plane the pin is for, or its root changed; nothing was sent to it"
        )));
    }
    let at = if server == addr.to_string() {
        server.to_string()
    } else {
        format!("{server} ({addr})")
    };
    r.ok(format!(
        "control plane at {at} serves the pinned root {} {}",
        isthmus_ca::root_hash(&pinned[0]),
        describe(&pinned[0], false)
    ));

    // 3. A connection verified against the pinned root; then the token goes out.
    let verifier = RecordingVerifier::enforcing(&pinned)
        .map_err(|e| r.fail(format!("the pinned root is unusable: {e}")))?;
    let channel = match connect(addr, &verifier, timeout).await {
        Ok(c) => c,
        Err(ConnectError::Handshake(e)) => {
            let issuer = verifier
                .seen()
                .and_then(|s| s.chain.first().map(|leaf| describe(leaf, true)))
                .unwrap_or_else(|| "an unknown issuer".into());
            return Err(r.fail(format!(
                "control plane at {server} serves the pinned root but presents a certificate issued by {issuer}, which does not chain to it for {CA_SERVER_NAME}: {e}; the token was not sent"
            )));
        }
        Err(e) => return Err(r.fail(connect_message(server, e))),
    };
    let mut request = tonic::Request::new(GetBundleRequest {});
    let bearer = format!("Bearer {token}").parse().map_err(|_| {
        r.fail(
            "read the join token: it has characters a token cannot have (it is not a join token)",
        )
    })?;
    request.metadata_mut().insert("authorization", bearer);
    let response = OnboardingClient::new(channel)
        .get_bundle(request)
        .await
        .map_err(|s| r.fail(status_message(server, &s, "get the bundle")))?
        .into_inner();

    // 4. The files: known names, sane sizes, the pinned root and our token among them.
    let mut bundle = Bundle::default();
    for f in response.files {
        let Some(name) = known_file(&f.name) else {
            return Err(r.fail(format!(
                "control plane at {server} sent a file {:?} that no bundle has",
                f.name
            )));
        };
        if f.contents.len() as u64 > MAX_FILE {
            return Err(r.fail(format!(
                "control plane at {server} sent a {name} larger than 1 MiB"
            )));
        }
        bundle.files.insert(name.to_string(), f.contents);
    }
    if let Err(e) = bundle.check("") {
        return Err(r.fail(format!(
            "control plane at {server} sent an incomplete bundle: {e}"
        )));
    }
    let bundle_roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&bundle.files[ROOT_CERT])
            .filter_map(Result::ok)
            .collect();
    if !pinned.iter().any(|p| bundle_roots.contains(p)) {
        return Err(r.fail(format!(
            "control plane at {server} sent a root-cert.pem without the pinned root {pin_list}"
        )));
    }
    if String::from_utf8_lossy(&bundle.files[TOKEN]).trim() != token {
        return Err(r.fail(format!(
            "control plane at {server} sent a token file that is not the join token given"
        )));
    }
    r.ok(format!(
        "fetched the bundle for {} from {server} ({} files; token {} checked, no use spent), over TLS verified against the pinned root",
        response.identity,
        bundle.files.len(),
        response.token_id
    ));
    Ok(bundle)
}

/// Checks a bundle's join token with the control plane it names (signature, expiry, revocation,
/// uses left) without spending a use: the same GetBundle call as `join --server`, over TLS
/// verified against the bundle's roots. `Ok(None)` when the control plane has no onboarding
/// API (an older server): nothing could be checked. Returns the identity and the token id.
pub(crate) async fn check_token(
    addr: SocketAddr,
    server_name: &str,
    roots: &[CertificateDer<'static>],
    token: &str,
    timeout: Duration,
) -> Result<Option<(String, String)>, String> {
    let what = addr.to_string();
    let verifier = RecordingVerifier::enforcing(roots).map_err(|e| e.to_string())?;
    let channel = connect_as(addr, server_name, &verifier, timeout)
        .await
        .map_err(|e| connect_message(&what, e))?;
    let mut request = tonic::Request::new(GetBundleRequest {});
    let bearer = format!("Bearer {}", token.trim()).parse().map_err(|_| {
        "the bundle's token file has characters a token cannot have: make a new bundle with `isthmus vm config`".to_string()
    })?;
    request.metadata_mut().insert("authorization", bearer);
    match OnboardingClient::new(channel).get_bundle(request).await {
        Ok(r) => {
            let r = r.into_inner();
            Ok(Some((r.identity, r.token_id)))
        }
        Err(s) if s.code() == Code::Unimplemented => Ok(None),
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => Err(format!(
            "the control plane at {what} refused the bundle's join token: {}; make a new bundle with `isthmus vm config` (or a new token with `isthmus token create`); nothing was installed",
            s.message()
        )),
        Err(s) => Err(status_message(&what, &s, "check the bundle's token")),
    }
}

/// The token itself, or the contents of `@FILE`, trimmed (`crate::tokenarg`).
fn read_token(arg: &str) -> Result<String, String> {
    crate::tokenarg::read("--token", arg).map_err(|e| e.to_string())
}

/// `HOST[:PORT]` (or `https://HOST[:PORT]`, `[v6]:PORT`) to one address.
async fn resolve(server: &str, timeout: Duration) -> Result<SocketAddr, String> {
    let s = server
        .trim()
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    let target = if bare.parse::<std::net::IpAddr>().is_ok() || !s.contains(':') {
        (bare.to_string(), DEFAULT_PORT)
    } else {
        let (host, port) = s.rsplit_once(':').unwrap_or((s, ""));
        let port = port.parse::<u16>().map_err(|_| {
            format!("{port:?} is not a port (expected HOST:PORT, e.g. 10.0.0.2:15012)")
        })?;
        (host.to_string(), port)
    };
    tokio::time::timeout(timeout, tokio::net::lookup_host(target))
        .await
        .map_err(|_| "the name lookup timed out".to_string())?
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "the name has no address".into())
}

/// TCP, then TLS with `verifier` for the control plane's name, then HTTP/2 for gRPC over that
/// one connection.
async fn connect(
    addr: SocketAddr,
    verifier: &Arc<RecordingVerifier>,
    timeout: Duration,
) -> Result<Channel, ConnectError> {
    connect_as(addr, CA_SERVER_NAME, verifier, timeout).await
}

async fn connect_as(
    addr: SocketAddr,
    server_name: &str,
    verifier: &Arc<RecordingVerifier>,
    timeout: Duration,
) -> Result<Channel, ConnectError> {
    let config = verifier
        .client_config()
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            ConnectError::Unreachable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| ConnectError::NotTls("no TLS answer within the time limit".into()))?
        .map_err(|e| match not_tls(&e) {
            true => ConnectError::NotTls(e.to_string()),
            false => ConnectError::Handshake(e.to_string()),
        })?;
    // tonic dials through a connector; this one hands over the connection made above, once.
    let io = Arc::new(Mutex::new(Some(TokioIo::new(tls))));
    let dial = tower::service_fn(move |_: http::Uri| {
        let io = io.lock().unwrap_or_else(|e| e.into_inner()).take();
        async move {
            io.ok_or_else(|| std::io::Error::other("the connection to the control plane closed"))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?
        .timeout(timeout)
        .connect_with_connector(dial)
        .await
        .map_err(|e| ConnectError::Unreachable(error_chain(&e)))
}

fn unreachable(server: &str, detail: &str) -> String {
    format!(
        "control plane at {server} (--server) is unreachable: {detail}; is `isthmus server` running there, and its gRPC port ({DEFAULT_PORT}) open to this host?"
    )
}

fn connect_message(server: &str, e: ConnectError) -> String {
    match e {
        ConnectError::Unreachable(d) => unreachable(server, &d),
        ConnectError::Handshake(d) => {
            format!("control plane at {server} (--server): TLS handshake failed: {d}")
        }
        ConnectError::NotTls(d) => not_tls_message(server, &d),
    }
}

/// Whether a failed handshake means the peer does not speak TLS at all (a plain-HTTP port
/// answers with bytes that are no TLS record; other servers close or stay silent).
pub(crate) fn not_tls(e: &std::io::Error) -> bool {
    use rustls::Error as R;
    if e.kind() == std::io::ErrorKind::UnexpectedEof
        || e.kind() == std::io::ErrorKind::ConnectionReset
    {
        return true;
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<R>()) {
        Some(R::InvalidMessage(_)) => true,
        Some(R::AlertReceived(_)) => false,
        _ => false,
    }
}

/// The message for a port that does not speak TLS.
pub(crate) fn not_tls_message(server: &str, detail: &str) -> String {
    format!(
        "{server} does not speak TLS ({detail}): is this the gRPC port ({DEFAULT_PORT})? The control plane's CA, discovery and onboarding are all on its gRPC port; the admin API (15080) and the registration API (8080) are not for hosts"
    )
}

fn status_message(server: &str, s: &tonic::Status, what: &str) -> String {
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => format!(
            "the control plane at {server} refused the join token: {}",
            s.message()
        ),
        Code::Unavailable => unreachable(server, s.message()),
        Code::Unimplemented => format!(
            "control plane at {server} cannot {what}: it has no onboarding API (an older `isthmus server`?); use `isthmus vm config` there and join from its files"
        ),
        code => format!(
            "control plane at {server} could not {what} ({code:?}): {}",
            s.message()
        ),
    }
}

/// An error and its sources: tonic's transport errors say little at the top.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_address_forms() {
        let t = Duration::from_secs(5);
        assert_eq!(
            resolve("10.0.0.2", t).await.unwrap(),
            "10.0.0.2:15012".parse().unwrap()
        );
        assert_eq!(
            resolve("https://10.0.0.2:4444/", t).await.unwrap(),
            "10.0.0.2:4444".parse().unwrap()
        );
        assert_eq!(
            resolve("[fd00::1]", t).await.unwrap(),
            "[fd00::1]:15012".parse().unwrap()
        );
        assert_eq!(resolve("localhost:7", t).await.unwrap().port(), 7);
        let e = resolve("localhost:http", t).await.unwrap_err();
        assert!(e.contains("\"http\" is not a port"), "{e}");
    }

    #[test]
    fn token_from_the_argument_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "abc.def.ghi\n").unwrap();
        assert_eq!(read_token(" abc.def.ghi ").unwrap(), "abc.def.ghi");
        assert_eq!(
            read_token(&format!("@{}", f.display())).unwrap(),
            "abc.def.ghi"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token(&format!("@{}", f.display()))
            .unwrap_err()
            .ends_with("is empty"));
        let e = read_token("./token").unwrap_err();
        assert_eq!(
            e,
            "--token \"./token\" looks like a file, not a token: write --token @./token to read the token from that file"
        );
        assert!(read_token("@/nonexistent/token")
            .unwrap_err()
            .starts_with("/nonexistent/token: "));
    }
}
