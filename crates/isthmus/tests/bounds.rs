//! What admin API clients can make `isthmus server` keep or compute is bounded: watch streams,
//! and the parsing of request bodies (never on the async workers, nesting and aliases limited).
//! The real binary over loopback; memory is the server process's VmRSS.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Watch streams the server serves at once (`Registry::MAX_WATCHERS`).
const MAX_WATCHERS: usize = 512;
/// What 500 idle watchers may add to the server's memory.
const WATCHERS_RSS_BOUND_KIB: u64 = 64 * 1024;
/// What refusing hostile documents may add to the server's memory.
const PARSE_RSS_BOUND_KIB: u64 = 128 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn addr(server: &Server) -> String {
    server.admin.trim_start_matches("http://").to_owned()
}

fn request(server: &Server, method: &str, path: &str, ctype: &str, body: &[u8]) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: isthmus\r\nAuthorization: Bearer {}\r\n\
         Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.token,
        body.len()
    )
}

/// One request on its own connection: the status code and the body.
fn call(server: &Server, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr(server)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request(server, method, path, ctype, body).as_bytes())
        .unwrap();
    // The server may answer (413) and close before reading all of a large body: read while
    // writing, or the answer is lost to the reset.
    let mut writer = s.try_clone().unwrap();
    let mut out = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _ = writer.write_all(body);
        });
        let _ = s.read_to_end(&mut out);
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{method} {path} {ctype} ({} bytes): no HTTP status in {text:?}",
                body.len()
            )
        });
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

/// Opens a watch and reads its response head; the connection stays open.
fn open_watch(server: &Server) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr(server)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "GET /api/v1/watch HTTP/1.1\r\nHost: isthmus\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "watch closed before its response head");
        got.extend_from_slice(&buf[..n]);
    }
    (s, String::from_utf8_lossy(&got).into_owned())
}

/// A registration and a list, each on a fresh connection; how long both took.
fn registration_and_list(server: &Server, i: usize) -> Duration {
    let start = Instant::now();
    let body = format!(r#"{{"service":"web","ip":"10.1.0.{i}","ports":["80"]}}"#);
    let (code, text) = call(
        server,
        "POST",
        "/api/v1/register",
        "application/json",
        body.as_bytes(),
    );
    assert_eq!(code, 200, "{text}");
    let (code, text) = call(server, "GET", "/api/v1/workloadentries", "", b"");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(&format!("10.1.0.{i}")), "{text}");
    start.elapsed()
}

#[test]
fn five_hundred_idle_watchers_stay_within_memory_bounds_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let pid = server.child.id();
    registration_and_list(&server, 1);
    let before = rss_kib(pid);

    let started = Instant::now();
    let mut watchers: Vec<TcpStream> = (0..500)
        .map(|_| {
            let (s, head) = open_watch(&server);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    let opened_in = started.elapsed();
    let with_500 = rss_kib(pid);
    let served_in = registration_and_list(&server, 2);

    // Up to the cap, then refused with the bound named.
    for _ in 500..MAX_WATCHERS {
        watchers.push(open_watch(&server).0);
    }
    let (_, refused) = open_watch(&server);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let (code, text) = call(&server, "GET", "/api/v1/watch", "", b"");
    assert_eq!(code, 503);
    assert!(
        text.contains(&format!("{MAX_WATCHERS} watch streams are open"))
            && text.contains("close idle watches"),
        "{text}"
    );
    let served_at_cap = registration_and_list(&server, 3);

    // A closed watch gives its slot back.
    drop(watchers.pop());
    let (_, head) = wait_for(
        "a watch slot to be free again",
        Duration::from_secs(20),
        || {
            let (s, head) = open_watch(&server);
            head.starts_with("HTTP/1.1 200").then_some((s, head))
        },
    );
    assert!(head.contains("text/event-stream"), "{head}");
    eprintln!(
        "server RSS {before} KiB before, {with_500} KiB with 500 idle watchers (opened in \
         {opened_in:?}); registration+list {served_in:?} with 500, {served_at_cap:?} at the cap"
    );
    assert!(
        with_500 < before + WATCHERS_RSS_BOUND_KIB,
        "500 watchers grew the server from {before} KiB to {with_500} KiB"
    );
}

/// The billion laughs: nine levels of aliases, each repeating the previous one nine times.
fn alias_bomb() -> String {
    let mut doc = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let refs = vec![format!("*{prev}"); 9].join(",");
        doc.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    doc
}

#[test]
fn deeply_nested_documents_and_alias_bombs_are_refused_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let pid = server.child.id();
    registration_and_list(&server, 1);
    let before = rss_kib(pid);

    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_yaml = format!("{}{}", "{a: ".repeat(100_000), "}".repeat(100_000));
    let bomb = alias_bomb();
    let too_large = vec![b' '; 2 << 20];
    let cases: [(&str, &str, &[u8], u16, &str); 5] = [
        (
            "application/json",
            "/api/v1/apply",
            deep_json.as_bytes(),
            400,
            "at most 128 levels",
        ),
        (
            "application/yaml",
            "/api/v1/apply",
            deep_yaml.as_bytes(),
            400,
            "at most 128 levels",
        ),
        (
            "application/yaml",
            "/api/v1/apply",
            bomb.as_bytes(),
            400,
            "alias bomb",
        ),
        (
            "application/json",
            "/api/v1/register",
            deep_json.as_bytes(),
            400,
            "invalid request body",
        ),
        (
            "application/yaml",
            "/api/v1/apply",
            &too_large,
            413,
            "larger than 1024 KiB",
        ),
    ];
    let started = Instant::now();
    std::thread::scope(|scope| {
        // Four clients send hostile documents over and over while another registers and lists.
        let attackers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    for _ in 0..5 {
                        for (ctype, path, body, code, says) in &cases {
                            let (got, text) = call(&server, "POST", path, ctype, body);
                            assert_eq!(got, *code, "{path} {ctype}: {text}");
                            assert!(text.contains(says), "{path} {ctype}: {text}");
                        }
                    }
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for i in 2..12 {
            slowest = slowest.max(registration_and_list(&server, i));
        }
        for a in attackers {
            a.join().unwrap();
        }
        let after = rss_kib(pid);
        eprintln!(
            "server RSS {before} KiB before, {after} KiB after 100 hostile documents in {:?}; \
             slowest registration+list meanwhile {slowest:?}",
            started.elapsed()
        );
        assert!(
            after < before + PARSE_RSS_BOUND_KIB,
            "hostile documents grew the server from {before} KiB to {after} KiB"
        );
    });
    registration_and_list(&server, 20);
}
