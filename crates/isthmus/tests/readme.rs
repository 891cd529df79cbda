//! The README's shell blocks, run as printed, so README and reality cannot drift apart.
//!
//! Every ```sh block in README.md is preceded by a marker:
//! - `<!-- test: run -->` (optionally `; expect: TEXT` more than once): run with bash, in
//!   README order, against a real `isthmus server --dev` (what `scripts/dev.sh` runs);
//!   it must succeed, and its stdout must hold each TEXT;
//! - `<!-- test: not run: REASON -->`: a second host, systemd, or a change to `/` this
//!   machine must not get; the reason says which, and which test covers it.
//!
//! A ```yaml block marked `<!-- test: file NAME -->` is written to NAME first (the files
//! the walk-through refers to).
//!
//! The blocks use the default ports (15080, 8080, 15012, 15054) and the example addresses
//! (the control plane at 10.0.0.2), so they run in a network namespace of their own: root
//! only, with a loud SKIP otherwise. The namespace has a default route, so `--dev` finds the
//! address hosts reach it at. `isthmus` is this build, first on PATH; `sudo` is the
//! identity, the test being root already.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[derive(Debug, PartialEq, Eq)]
enum Marker {
    Run { expect: Vec<String> },
    File(String),
    NotRun(String),
}

#[derive(Debug)]
struct Block {
    /// Line of the opening fence, 1-based.
    line: usize,
    lang: String,
    marker: Option<Marker>,
    text: String,
}

fn parse_marker(comment: &str) -> Result<Marker, String> {
    let body = comment
        .trim()
        .strip_prefix("<!-- test:")
        .and_then(|b| b.strip_suffix("-->"))
        .ok_or("not a test marker")?
        .trim();
    if let Some(reason) = body.strip_prefix("not run:") {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err("`not run:` needs a reason".into());
        }
        return Ok(Marker::NotRun(reason.into()));
    }
    if let Some(name) = body.strip_prefix("file ") {
        return Ok(Marker::File(name.trim().into()));
    }
    let mut parts = body.split(';').map(str::trim);
    if parts.next() != Some("run") {
        return Err(format!(
            "unknown marker {body:?} (run, not run: REASON, file NAME)"
        ));
    }
    let expect = parts
        .map(|p| {
            p.strip_prefix("expect:")
                .map(|t| t.trim().to_string())
                .ok_or_else(|| format!("unknown part {p:?} (expect: TEXT)"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Marker::Run { expect })
}

/// The fenced blocks of `md`, each with the marker on the line before it (blank lines
/// between allowed).
fn blocks(md: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut marker = None;
    let mut lines = md.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if line.trim_start().starts_with("<!-- test:") {
            marker = Some(parse_marker(line).map_err(|e| format!("README.md:{}: {e}", i + 1))?);
            continue;
        }
        let Some(lang) = line.strip_prefix("```") else {
            if !line.trim().is_empty() {
                marker = None;
            }
            continue;
        };
        let mut text = String::new();
        for (_, l) in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            text.push_str(l);
            text.push('\n');
        }
        out.push(Block {
            line: i + 1,
            lang: lang.trim().to_string(),
            marker: marker.take(),
            text,
        });
    }
    Ok(out)
}

fn readme() -> Vec<Block> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    blocks(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_shell_block_of_the_readme_is_run_or_says_why_not() {
    let unmarked: Vec<usize> = readme()
        .iter()
        .filter(|b| b.lang == "sh" && b.marker.is_none())
        .map(|b| b.line)
        .collect();
    assert!(
        unmarked.is_empty(),
        "README.md: the ```sh blocks at lines {unmarked:?} have no <!-- test: run --> or <!-- test: not run: REASON --> before them"
    );
    let runs = readme()
        .iter()
        .filter(|b| matches!(b.marker, Some(Marker::Run { .. })))
        .count();
    assert!(runs >= 4, "only {runs} blocks of the README are run");
}

#[test]
fn markers_parse() {
    assert_eq!(
        parse_marker("<!-- test: run; expect: created; expect: a b -->").unwrap(),
        Marker::Run {
            expect: vec!["created".into(), "a b".into()]
        }
    );
    assert_eq!(
        parse_marker("<!-- test: not run: systemd -->").unwrap(),
        Marker::NotRun("systemd".into())
    );
    assert!(parse_marker("<!-- test: not run: -->").is_err());
    assert!(parse_marker("<!-- test: maybe -->").is_err());
    let b = blocks("<!-- test: file a.yaml -->\n\n```yaml\nx: 1\n```\n```sh\nls\n```\n").unwrap();
    assert_eq!(b[0].marker, Some(Marker::File("a.yaml".into())));
    assert_eq!(
        (b[0].text.as_str(), b[1].marker.is_none()),
        ("x: 1\n", true)
    );
}

/// The control plane's address in the README's examples.
const CONTROL_PLANE: &str = "10.0.0.2";

#[test]
fn the_readme_walk_through_runs_as_printed() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP the_readme_walk_through_runs_as_printed: needs root (a network namespace of its own, so the README's default ports and addresses are free)"
        );
        return;
    }
    let blocks = readme();
    let mut lab = lab::Lab::new("rdm", &[("cp", CONTROL_PLANE)], "127.0.0.1");
    let ns = lab.ns("cp");
    let out = std::process::Command::new("ip")
        .args(["-n", &ns, "route", "add", "default", "via", "10.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let tmp = tempfile::tempdir().unwrap();
    let (home, work) = (tmp.path().join("home"), tmp.path().join("work"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = |cmd: &mut std::process::Command| {
        cmd.current_dir(&work)
            .env("HOME", &home)
            .env("PATH", &path)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_RUNTIME_DIR");
        for (k, _) in std::env::vars() {
            if k.starts_with("ISTHMUS_") {
                cmd.env_remove(k);
            }
        }
    };

    // What scripts/dev.sh runs.
    let mut server = lab.command("cp", &["isthmus", "server", "--dev"]);
    env(&mut server);
    let mut child = server
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    lab.children.push(child);
    assert!(
        banner.contains(&format!(
            "hosts reach this control plane at {CONTROL_PLANE}:15012 (--advertise-ip to change)"
        )),
        "{banner}"
    );

    for b in &blocks {
        if let Some(Marker::File(name)) = &b.marker {
            std::fs::write(work.join(name), &b.text).unwrap();
        }
    }
    let mut ran = 0;
    for b in &blocks {
        let Some(Marker::Run { expect }) = &b.marker else {
            continue;
        };
        let script = format!("sudo() {{ \"$@\"; }}\n{}", b.text);
        let mut cmd = lab.command("cp", &["bash", "-e", "-o", "pipefail", "-c", &script]);
        env(&mut cmd);
        let out = wait_output(cmd, Duration::from_secs(60));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        // Shown on failure (the harness captures it), and with --no-capture.
        eprintln!("--- README.md:{}\n{stdout}{stderr}", b.line);
        assert!(
            out.status.success(),
            "README.md:{}: the block failed ({}):\n{}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
            b.line,
            out.status,
            b.text
        );
        for e in expect {
            assert!(
                stdout.contains(e.as_str()),
                "README.md:{}: the block's output has no {e:?}:\n{stdout}\n--- stderr:\n{stderr}",
                b.line
            );
        }
        ran += 1;
    }
    eprintln!("ran {ran} blocks of the README");
}

/// Runs `cmd`, killing it after `limit` (a block that hangs fails instead of stalling the
/// suite).
fn wait_output(mut cmd: std::process::Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    out
}
