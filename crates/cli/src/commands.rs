//! The operator's commands. Each returns an error whose message is the one line the user sees.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use futures::StreamExt;
use isthmus_control_plane::registry::{
    Action, ApplyResult, DeregisterRequest, DeregisterResponse, RegisterRequest, RegisterResponse,
    WatchEvent,
};
use isthmus_model::{Kind, Resource};
use reqwest::Method;
use serde_json::Value;

use crate::args::{Command, Output, TokenCommand, VmCommand};
use crate::client::{enc, Client, ClientError};
use crate::output;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {cause}")]
    Read { path: String, cause: String },
    #[error(transparent)]
    VmConfig(#[from] crate::vmconfig::VmConfigError),
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
}

fn key_values(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>, CommandError> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CommandError::Usage(format!("{flag} {kv:?} must be KEY=VALUE")))
        })
        .collect()
}

fn kind_arg(s: &str) -> Result<Kind, CommandError> {
    s.parse::<Kind>()
        .map_err(|e| CommandError::Usage(e.to_string()))
}

fn action(a: Action) -> &'static str {
    match a {
        Action::Created => "created",
        Action::Updated => "updated",
        Action::Unchanged => "unchanged",
        Action::Deleted => "deleted",
    }
}

/// Runs an operator command (everything but `server`, `agent` and `completion`).
pub async fn run(cmd: Command, out: &mut dyn Write) -> Result<(), CommandError> {
    let w = |out: &mut dyn Write, s: String| {
        let _ = out.write_all(s.as_bytes());
    };
    match cmd {
        Command::Register {
            service,
            ip,
            ports,
            namespace,
            service_account,
            labels,
            annotations,
            conn,
        } => {
            let client = Client::from_connection(&conn)?;
            let service_account = match service_account {
                Some(sa) => sa,
                None => match agent_service_account(&client, &ip, &namespace).await {
                    Some(sa) => {
                        w(
                            out,
                            format!("Service account {sa}: the identity of the agent connected from {ip}\n"),
                        );
                        sa
                    }
                    None => {
                        w(
                            out,
                            format!("Service account default: no agent of namespace {namespace} is connected from {ip} (if one will serve it, pass -s with its service account)\n"),
                        );
                        isthmus_model::DEFAULT_SERVICE_ACCOUNT.to_string()
                    }
                },
            };
            let req = RegisterRequest {
                service,
                namespace,
                ip,
                ports,
                service_account,
                labels: key_values("--labels", &labels)?,
                annotations: key_values("--annotations", &annotations)?,
            };
            let body = serde_json::to_vec(&req).unwrap_or_default();
            let r: RegisterResponse = client
                .json(
                    Method::POST,
                    // Answered once DNS and discovery serve it: a `dig` right after finds it.
                    "/api/v1/register?wait=true",
                    Some(("application/json", body)),
                )
                .await?;
            let vip = r.vip.map_or("no VIP".into(), |v| format!("VIP {v}"));
            w(
                out,
                format!(
                    "Service {}/{} {} ({}, {})\n",
                    req.namespace,
                    req.service,
                    action(r.service),
                    r.hostname,
                    vip
                ),
            );
            w(
                out,
                format!(
                    "WorkloadEntry {}/{} {}\n",
                    req.namespace,
                    r.workload_entry_name,
                    action(r.workload_entry)
                ),
            );
        }
        Command::Deregister {
            service,
            ip,
            namespace,
            conn,
        } => {
            let client = Client::from_connection(&conn)?;
            let req = DeregisterRequest {
                service: service.clone(),
                namespace: namespace.clone(),
                ip,
            };
            let body = serde_json::to_vec(&req).unwrap_or_default();
            let r: DeregisterResponse = client
                .json(
                    Method::POST,
                    "/api/v1/deregister",
                    Some(("application/json", body)),
                )
                .await?;
            for e in &r.removed_entries {
                w(out, format!("WorkloadEntry {namespace}/{e} deleted\n"));
            }
            if r.service_deleted {
                w(
                    out,
                    format!("Service {namespace}/{service} deleted (no endpoint left)\n"),
                );
            }
        }
        Command::Apply { filename, conn } => {
            let text = if filename == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .map_err(|e| CommandError::Read {
                        path: "standard input".into(),
                        cause: e.to_string(),
                    })?;
                s
            } else {
                std::fs::read_to_string(&filename).map_err(|e| CommandError::Read {
                    path: filename.clone(),
                    cause: e.to_string(),
                })?
            };
            let client = Client::from_connection(&conn)?;
            let r: Value = client
                .json(
                    Method::POST,
                    "/api/v1/apply?wait=true",
                    Some(("application/yaml", text.into_bytes())),
                )
                .await?;
            let results: Vec<ApplyResult> =
                serde_json::from_value(r["results"].clone()).unwrap_or_default();
            for a in results {
                w(
                    out,
                    format!(
                        "{} {}/{} {}\n",
                        a.kind,
                        a.namespace,
                        a.name,
                        action(a.action)
                    ),
                );
            }
        }
        Command::Delete {
            kind,
            name,
            namespace,
            conn,
        } => {
            let kind = kind_arg(&kind)?;
            let client = Client::from_connection(&conn)?;
            let path = format!(
                "/api/v1/namespaces/{}/{}/{}",
                enc(&namespace),
                kind.plural(),
                enc(&name)
            );
            let _: Value = client.json(Method::DELETE, &path, None).await?;
            w(out, format!("{kind} {namespace}/{name} deleted\n"));
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            selector,
            output: fmt,
            watch,
            conn,
        } => {
            let kind = kind_arg(&kind)?;
            let client = Client::from_connection(&conn)?;
            let ns = (!all_namespaces).then_some(namespace);
            if watch {
                return watch_cmd(&client, kind, ns, selector, fmt, out).await;
            }
            if let Some(name) = name {
                let ns = ns.unwrap_or_default();
                let path = format!(
                    "/api/v1/namespaces/{}/{}/{}",
                    enc(&ns),
                    kind.plural(),
                    enc(&name)
                );
                let r: Resource = client.json(Method::GET, &path, None).await?;
                let s = match fmt {
                    Output::Json => output::json(&r),
                    Output::Yaml => output::yaml(&r),
                    Output::Table | Output::Wide => {
                        let eps = endpoint_counter(&client, kind, std::slice::from_ref(&r)).await?;
                        output::rows(kind, &[r], false, fmt == Output::Wide, &eps)
                    }
                };
                w(out, s);
                return Ok(());
            }
            let mut path = match &ns {
                Some(ns) => format!("/api/v1/namespaces/{}/{}", enc(ns), kind.plural()),
                None => format!("/api/v1/{}", kind.plural()),
            };
            if let Some(sel) = &selector {
                path.push_str(&format!("?labelSelector={}", enc(sel)));
            }
            let list: Value = client.json(Method::GET, &path, None).await?;
            let items: Vec<Resource> =
                serde_json::from_value(list["items"].clone()).map_err(|e| {
                    ClientError::Protocol {
                        url: client.base.clone(),
                        cause: e.to_string(),
                    }
                })?;
            let s = match fmt {
                Output::Json => output::json(&list),
                Output::Yaml => output::yaml(&list),
                Output::Table | Output::Wide if items.is_empty() => match &ns {
                    Some(ns) => format!("No {} found in namespace {ns}.\n", kind.plural()),
                    None => format!("No {} found.\n", kind.plural()),
                },
                Output::Table | Output::Wide => {
                    let eps = endpoint_counter(&client, kind, &items).await?;
                    output::rows(kind, &items, ns.is_none(), fmt == Output::Wide, &eps)
                }
            };
            w(out, s);
        }
        Command::Token { command } => token_cmd(command, out).await?,
        Command::Iptables {
            dry_run,
            cleanup,
            cluster_env,
            sidecar_env,
            env,
            netns,
        } => {
            let (nf, rt) = match netns {
                Some(ns) => (
                    isthmus_intercept::SystemNetfilter::in_netns(ns.clone()),
                    isthmus_intercept::SystemRouting::in_netns(ns),
                ),
                None => (
                    isthmus_intercept::SystemNetfilter::new(),
                    isthmus_intercept::SystemRouting::new(),
                ),
            };
            if cleanup {
                // Routes first: a VIP network routed to lo without its rules goes nowhere. Each
                // is tried even when the other fails.
                let routes = isthmus_intercept::cleanup_routes(&rt);
                let rules = isthmus_intercept::cleanup(&nf);
                let removed = match (rules, routes) {
                    (Ok(a), Ok(b)) => a || b,
                    (Err(e), Ok(_)) => return Err(CommandError::Usage(e.to_string())),
                    (Ok(_), Err(e)) => {
                        return Err(CommandError::Usage(format!(
                            "the interception rules are removed, the ISTHMUS_VIP_CIDR routes \
                             are not: {e}"
                        )))
                    }
                    (Err(a), Err(b)) => {
                        return Err(CommandError::Usage(format!("{a}; and the routes: {b}")))
                    }
                };
                w(
                    out,
                    if removed {
                        "interception rules removed\n".into()
                    } else {
                        "no interception rules were installed\n".into()
                    },
                );
            } else if dry_run {
                let overrides: Vec<(String, String)> =
                    key_values("--env", &env)?.into_iter().collect();
                let read = |p: &std::path::Path| {
                    isthmus_intercept::EnvFile::read_optional(p)
                        .map_err(|e| CommandError::Usage(e.to_string()))
                };
                let cluster = read(&cluster_env)?;
                let cfg = isthmus_intercept::InterceptConfig::from_env(
                    &cluster,
                    &read(&sidecar_env)?,
                    &overrides,
                )
                .map_err(|e| CommandError::Usage(e.to_string()))?;
                // The agent would refuse these files; stdout stays iptables-restore input.
                if let Err(e) = cfg.check_capture(&cluster) {
                    eprintln!("warning: {e}");
                }
                w(out, isthmus_intercept::dry_run(&cfg));
            }
        }
        Command::Vm { command } => vm_cmd(command, out).await?,
        Command::Status(args) => crate::status::run(args, out).await?,
        Command::Join(args) => crate::join::run(args, out).await?,
        Command::Doctor(args) => crate::doctor::run(args, out)
            .await
            .map_err(CommandError::Usage)?,
        Command::Server(_) | Command::Agent(_) | Command::Demo(_) | Command::Completion { .. } => {
            return Err(CommandError::Usage("not an operator command".into()))
        }
    }
    Ok(())
}

/// For service tables: how many workload entries serve each service.
/// The service account of an agent connected from `ip` with an identity in `namespace`: an
/// endpoint registered under it is reached over HBONE and its certificate matches. `None` when
/// there is none (or the server cannot tell). The status list's `ip` is only ever an address
/// the server verified (the agent connects from it, or its certificate or an enrolment names
/// it), never a node id's bare claim, so no client can lend its account to another's address.
async fn agent_service_account(client: &Client, ip: &str, namespace: &str) -> Option<String> {
    let proxies: Vec<serde_json::Value> = client
        .json(Method::GET, "/api/v1/proxies", None)
        .await
        .ok()?;
    proxies.iter().find_map(|p| {
        if p["ip"].as_str()? != ip {
            return None;
        }
        // spiffe://<trust domain>/ns/<namespace>/sa/<service account>
        let id = p["identity"].as_str()?;
        let rest = id.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/').skip(1);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa)) if ns == namespace => Some(sa.to_string()),
            _ => None,
        }
    })
}

async fn endpoint_counter(
    client: &Client,
    kind: Kind,
    items: &[Resource],
) -> Result<impl Fn(&Resource) -> usize, CommandError> {
    let mut entries = Vec::new();
    if kind == Kind::Service && !items.is_empty() {
        let list: Value = client
            .json(Method::GET, "/api/v1/workloadentries", None)
            .await?;
        let all: Vec<Resource> = serde_json::from_value(list["items"].clone()).unwrap_or_default();
        entries = all
            .into_iter()
            .filter_map(|r| match r {
                Resource::WorkloadEntry(w) => Some(w),
                _ => None,
            })
            .collect();
    }
    Ok(move |r: &Resource| match r {
        Resource::Service(s) => entries.iter().filter(|w| w.serves(s)).count(),
        _ => 0,
    })
}

/// Follows the server-sent events of /api/v1/watch, resuming after the last event seen when the
/// connection drops (e.g. the server restarts), for up to a minute of retries.
async fn watch_cmd(
    client: &Client,
    kind: Kind,
    ns: Option<String>,
    selector: Option<String>,
    fmt: Output,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let mut path = format!("/api/v1/watch?kind={}", kind.plural());
    if let Some(ns) = &ns {
        path.push_str(&format!("&namespace={}", enc(ns)));
    }
    if let Some(sel) = &selector {
        path.push_str(&format!("&labelSelector={}", enc(sel)));
    }
    let mut last: Option<i64> = None;
    let mut failures = 0u32;
    let mut header_done = false;
    loop {
        let p = match last {
            Some(rev) => format!("{path}&revision={}", rev + 1),
            None => path.clone(),
        };
        let resp = match client.send(Method::GET, &p, None).await {
            Ok(r) => r,
            Err(e @ ClientError::Unreachable { .. }) if last.is_some() && failures < 30 => {
                failures += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        failures = 0;
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        let (mut event, mut data) = (String::new(), String::new());
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    if event == "ERROR" {
                        let v: Value = serde_json::from_str(&data).unwrap_or_default();
                        return Err(CommandError::Usage(format!(
                            "watch failed: {}",
                            v["error"]["message"].as_str().unwrap_or(&data)
                        )));
                    }
                    if !data.is_empty() {
                        if let Ok(ev) = serde_json::from_str::<WatchEvent>(&data) {
                            last = Some(ev.revision);
                            print_event(&ev, kind, ns.is_none(), fmt, &mut header_done, out);
                        }
                    }
                    event.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                }
            }
        }
        // The stream ended: the server went away or is shutting down. Resume from `last`.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_event(
    ev: &WatchEvent,
    kind: Kind,
    all_ns: bool,
    fmt: Output,
    header_done: &mut bool,
    out: &mut dyn Write,
) {
    let ty = format!("{:?}", ev.kind).to_uppercase();
    let s = match fmt {
        Output::Json => serde_json::to_string(ev).unwrap_or_default() + "\n",
        Output::Yaml => format!("---\n{}", output::yaml(ev)),
        Output::Table | Output::Wide => {
            let t = output::rows(
                kind,
                std::slice::from_ref(&ev.object),
                all_ns,
                fmt == Output::Wide,
                &|_| 0,
            );
            let mut lines = t.lines();
            let header = lines.next().unwrap_or_default();
            let row = lines.next().unwrap_or_default();
            let mut s = String::new();
            if !*header_done {
                s.push_str(&format!("{:<10}{header}\n", "EVENT"));
                *header_done = true;
            }
            s.push_str(&format!("{ty:<10}{row}\n"));
            s
        }
    };
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

async fn token_cmd(cmd: TokenCommand, out: &mut dyn Write) -> Result<(), CommandError> {
    match cmd {
        TokenCommand::Create {
            namespace,
            service_account,
            group,
            ttl,
            uses,
            output,
            conn,
        } => {
            let client = Client::from_connection(&conn)?;
            // An empty service account is the server's to fill: the group's, else `default`.
            let body = serde_json::json!({"namespace": namespace, "serviceAccount": service_account.unwrap_or_default(), "group": group, "ttl": ttl, "uses": uses});
            let r: Value = client
                .json(
                    Method::POST,
                    "/api/v1/tokens",
                    Some(("application/json", body.to_string().into_bytes())),
                )
                .await?;
            let text = match output.as_str() {
                "json" => output::json(&r),
                "text" => {
                    let uses = r["maxUses"]
                        .as_u64()
                        .map_or("any number of".into(), |u| u.to_string());
                    eprintln!(
                        "token {} for {}: valid until {}, for {uses} certificate(s)",
                        r["id"].as_str().unwrap_or_default(),
                        r["identity"].as_str().unwrap_or_default(),
                        output::unix_time(r["expiresAt"].as_u64().unwrap_or_default()),
                    );
                    let pins: Vec<&str> = r["rootHashes"]
                        .as_array()
                        .map(|p| p.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    if !pins.is_empty() {
                        eprintln!(
                            "it pins the mesh root {} for `isthmus join --server <control-plane>:15012 --token ...`",
                            pins.join(", ")
                        );
                    }
                    // Redirected to a file, the token is the file's whole content: clients such
                    // as Istio's ztunnel send a token file's bytes verbatim.
                    let end = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        "\n"
                    } else {
                        ""
                    };
                    format!("{}{end}", r["token"].as_str().unwrap_or_default())
                }
                other => {
                    return Err(CommandError::Usage(format!(
                        "-o {other:?}: expected text or json"
                    )))
                }
            };
            let _ = out.write_all(text.as_bytes());
        }
        TokenCommand::List { output: fmt, conn } => {
            let client = Client::from_connection(&conn)?;
            let r: Value = client.json(Method::GET, "/api/v1/tokens", None).await?;
            let text = match fmt {
                Output::Json => output::json(&r),
                Output::Yaml => output::yaml(&r),
                Output::Table | Output::Wide => {
                    let items = r["items"].as_array().cloned().unwrap_or_default();
                    if items.is_empty() {
                        "No tokens.\n".to_string()
                    } else {
                        let rows: Vec<Vec<String>> = items
                            .iter()
                            .map(|t| {
                                vec![
                                    t["id"].as_str().unwrap_or_default().to_string(),
                                    t["identity"].as_str().unwrap_or_default().to_string(),
                                    output::unix_time(t["expiresAt"].as_u64().unwrap_or_default()),
                                    match t["maxUses"].as_u64() {
                                        Some(m) => format!("{}/{m}", t["uses"]),
                                        None => format!("{}", t["uses"]),
                                    },
                                    t["state"].as_str().unwrap_or_default().to_string(),
                                ]
                            })
                            .collect();
                        output::table(&["ID", "IDENTITY", "EXPIRES", "USES", "STATE"], &rows)
                    }
                }
            };
            let _ = out.write_all(text.as_bytes());
        }
        TokenCommand::Revoke { id, conn } => {
            let client = Client::from_connection(&conn)?;
            let _: Value = client
                .json(
                    Method::DELETE,
                    &format!("/api/v1/tokens/{}", enc(&id)),
                    None,
                )
                .await?;
            let _ = writeln!(out, "token {id} revoked");
        }
    }
    Ok(())
}

async fn vm_cmd(cmd: VmCommand, out: &mut dyn Write) -> Result<(), CommandError> {
    match cmd {
        VmCommand::Config(args) => crate::vmconfig::run(args, out).await?,
        VmCommand::Certs {
            namespace,
            service_account,
            output_dir,
            all,
            lifetime,
            conn,
        } => {
            let client = Client::from_connection(&conn)?;
            let body = serde_json::json!({
                "namespace": namespace, "serviceAccount": service_account,
                "bootstrap": all, "lifetime": lifetime,
            });
            let r: Value = client
                .json(
                    Method::POST,
                    "/api/v1/certs",
                    Some(("application/json", body.to_string().into_bytes())),
                )
                .await?;
            let write_err = |path: &std::path::Path, e: std::io::Error| CommandError::Read {
                path: path.display().to_string(),
                cause: format!("cannot write: {e}"),
            };
            std::fs::create_dir_all(&output_dir).map_err(|e| write_err(&output_dir, e))?;
            let mut files = vec![(
                "root-cert.pem",
                r["rootCert"].as_str().unwrap_or_default(),
                0o644,
            )];
            if all {
                // The key first, so the certificate never sits on disk without it.
                files.insert(0, ("key.pem", r["key"].as_str().unwrap_or_default(), 0o600));
                files.push((
                    "cert-chain.pem",
                    r["certChain"].as_str().unwrap_or_default(),
                    0o644,
                ));
            }
            for (name, contents, mode) in files {
                let path = output_dir.join(name);
                isthmus_control_plane::server::write_atomic(&path, contents.as_bytes(), mode)
                    .map_err(|e| write_err(&path, e))?;
                let _ = writeln!(out, "wrote {}", path.display());
            }
            if all {
                let _ = writeln!(
                    out,
                    "bootstrap certificate for {}",
                    r["identity"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
