//! The admin API over real HTTP: each malformed request gets its own status and message, and
//! leaves the registry unchanged.

mod common;
use common::*;
use serde_json::{json, Value};

struct Api<'a> {
    s: &'a Server,
    http: reqwest::Client,
}

impl Api<'_> {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        ct: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let resp = self
            .http
            .request(method, self.s.url(path))
            .bearer_auth(&self.s.token)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, "application/json", "")
            .await
    }

    async fn revision(&self) -> i64 {
        let (_, v) = self.get("/api/v1/services").await;
        v["revision"].as_i64().unwrap()
    }

    /// Asserts the request fails with `status` and a message containing `msg`, and that the
    /// store's revision did not move.
    async fn refused(
        &self,
        method: reqwest::Method,
        path: &str,
        ct: &str,
        body: impl Into<reqwest::Body>,
        status: u16,
        msg: &str,
    ) {
        let before = self.revision().await;
        let (got, v) = self.call(method, path, ct, body).await;
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(got, status, "{path}: {v}");
        assert!(
            message.contains(msg),
            "{path}: expected {msg:?} in {message:?}"
        );
        assert_eq!(v["error"]["code"], status);
        assert_eq!(
            self.revision().await,
            before,
            "{path}: a refused request changed the store"
        );
    }
}

const SVC: &str = r#"{"apiVersion":"isthmus.io/v1","kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80}]}}"#;

#[tokio::test]
async fn malformed_requests_are_refused_and_change_nothing() {
    use reqwest::Method as M;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let api = Api {
        s: &s,
        http: reqwest::Client::new(),
    };
    let (st, _) = api
        .call(M::POST, "/api/v1/apply", "application/json", SVC)
        .await;
    assert_eq!(st, 200);

    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/yaml",
        "kind: Service\nmetadata: {name: [\n",
        400,
        "document 1: not valid YAML or JSON",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        "{\"kind\": ",
        400,
        "not valid YAML or JSON",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        SVC.replace("\"port\":80", "\"port\":\"eighty\""),
        400,
        "spec.ports[0].port: invalid type: string \"eighty\", expected u32",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        SVC.replace("\"ports\"", "\"portz\""),
        400,
        "unknown field `portz`",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        SVC.replace("Service", "Pod"),
        400,
        "unknown kind \"Pod\"",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        SVC.replace("\"port\":80", "\"port\":0"),
        422,
        "spec.ports[0].port: \"0\" is out of range",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        SVC.replace("\"name\":\"web\"", "\"name\":\"Web!\""),
        422,
        "metadata.name: \"Web!\"",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/apply",
        "application/json",
        vec![b' '; 2 * 1024 * 1024],
        413,
        "request body is larger than 1024 KiB",
    )
    .await;
    api.refused(
        M::PUT,
        "/api/v1/namespaces/other/services/web",
        "application/json",
        SVC,
        400,
        "the body is Service shop/web but the URL names Service other/web",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/register",
        "application/json",
        r#"{"service":"db","ip":"10.0.0.1","ports":[3306]}"#,
        400,
        "invalid request body at ports[0]: invalid type: integer `3306`, expected a string",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/register",
        "application/json",
        r#"{"service":"db","ip":"10.0.0.1"}"#,
        400,
        "at least one port is needed",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/register",
        "application/json",
        r#"{"service":"db","ip":"10.0.0.1","ports":["1"],"color":"x"}"#,
        400,
        "unknown field `color`",
    )
    .await;
    api.refused(
        M::POST,
        "/api/v1/deregister",
        "application/json",
        r#"{"service":"web","namespace":"shop","ip":"10.9.9.9"}"#,
        404,
        "endpoint 10.9.9.9 of service shop/web not found",
    )
    .await;
    api.refused(
        M::GET,
        "/api/v1/pods",
        "application/json",
        "",
        404,
        "unknown kind \"pods\"",
    )
    .await;
    api.refused(
        M::GET,
        "/api/v1/services?labelSelector=a%20b%3Dc",
        "application/json",
        "",
        400,
        "invalid label selector term \"a b=c\"",
    )
    .await;
    api.refused(
        M::GET,
        "/api/v1/services?colour=red",
        "application/json",
        "",
        400,
        "bad query parameters",
    )
    .await;
    api.refused(
        M::GET,
        "/api/v2/things",
        "application/json",
        "",
        404,
        "no route for GET /api/v2/things; the API is described at /openapi.yaml",
    )
    .await;
    api.refused(
        M::DELETE,
        "/api/v1/namespaces/shop/services/nope",
        "application/json",
        "",
        404,
        "Service shop/nope not found",
    )
    .await;

    // Compare-and-swap: an update that names a stale resourceVersion is refused.
    let (_, cur) = api.get("/api/v1/namespaces/shop/services/web").await;
    let rv = cur["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut stale = cur.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    stale["spec"]["ports"][0]["port"] = json!(81);
    if rv != "1" {
        api.refused(
            M::PUT,
            "/api/v1/namespaces/shop/services/web",
            "application/json",
            stale.to_string(),
            409,
            "was changed since resourceVersion 1",
        )
        .await;
    }
    let mut fresh = cur.clone();
    fresh["spec"]["ports"][0]["port"] = json!(81);
    let (st, v) = api
        .call(
            M::PUT,
            "/api/v1/namespaces/shop/services/web",
            "application/json",
            fresh.to_string(),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["spec"]["ports"][0]["port"], 81);
    assert_eq!(
        v["status"]["vip"], cur["status"]["vip"],
        "an update keeps the VIP"
    );
    assert_eq!(v["metadata"]["uid"], cur["metadata"]["uid"]);

    // Validation errors carry every field problem as details.
    let (st, v) = api
        .call(
            M::POST,
            "/api/v1/apply",
            "application/json",
            SVC.replace("\"port\":80", "\"port\":70000,\"protocol\":\"SMTP\""),
        )
        .await;
    assert_eq!(st, 422);
    let fields: Vec<&str> = v["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["spec.ports[0].port", "spec.ports[0].protocol"]);
}

#[tokio::test]
async fn authentication_is_required_on_the_api_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let http = reqwest::Client::new();
    let r = http.get(s.url("/api/v1/services")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("missing bearer token"));
    let r = http
        .get(s.url("/api/v1/services"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("invalid admin token"));
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.yaml"] {
        assert_eq!(
            http.get(s.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    // The admin token file is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn legacy_registration_api_matches_the_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&[
        "register",
        "productpage",
        "10.60.1.4",
        "http:8080",
        "-n",
        "bookinfo",
        "-l",
        "version=v1",
    ]);
    let http = reqwest::Client::new();
    let all: Value = http
        .get(format!("{}/v1/registration", s.registration))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        all,
        json!([{"service-key": "productpage.bookinfo.svc.cluster.local|http",
                "hosts": [{"ip_address": "10.60.1.4", "port": 8080, "tags": {"version": "v1"}}]}])
    );
    let one: Value = http
        .get(format!(
            "{}/v1/registration/productpage.bookinfo.svc.cluster.local%7Chttp",
            s.registration
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        one,
        json!({"hosts": [{"ip_address": "10.60.1.4", "port": 8080, "tags": {"version": "v1"}}]})
    );
    let r = http
        .get(format!(
            "{}/v1/registration/nope.x.svc.cluster.local%7Chttp",
            s.registration
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(format!("{}/v1/registration/no-port-name", s.registration))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{}/v1/registration", s.registration))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn metrics_count_requests_and_resources() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&["register", "a", "10.0.0.1", "80"]);
    s.ok(&["register", "b", "10.0.0.2", "80"]);
    // The resource counts come from the in-memory registry, which follows the store within a
    // second (its debounce): scrape until both registrations are in.
    let mut text = String::new();
    for _ in 0..50 {
        text = reqwest::get(format!("{}/metrics", s.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("isthmus_registry_resources{kind=\"WorkloadEntry\"} 2") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .to_string()
    };
    assert_eq!(
        line("isthmus_registry_resources{kind=\"Service\"}"),
        "isthmus_registry_resources{kind=\"Service\"} 2"
    );
    assert_eq!(
        line("isthmus_registry_resources{kind=\"WorkloadEntry\"}"),
        "isthmus_registry_resources{kind=\"WorkloadEntry\"} 2"
    );
    assert_eq!(
        line("isthmus_registry_revision "),
        "isthmus_registry_revision 2"
    );
    assert!(line("isthmus_http_requests_total{api=\"admin\",method=\"POST\",route=\"/api/v1/register\",code=\"200\"}").ends_with(" 2"));
    assert!(text.contains("isthmus_http_request_duration_seconds_bucket"));
    // Every store request is timed; two registrations are at least two committed transactions.
    let txns: u64 = line("isthmus_store_request_duration_seconds_count{op=\"txn\",outcome=\"ok\"}")
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(txns >= 2, "{text}");
}

/// Server-sent events: current state first, then changes; `Last-Event-ID` resumes with no gap.
#[tokio::test]
async fn watch_streams_and_resumes() {
    use futures_lite::*;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&["register", "a", "10.0.0.1", "80"]);
    let http = reqwest::Client::new();
    let open = |last: Option<i64>| {
        let mut req = http
            .get(s.url("/api/v1/watch?kind=services"))
            .bearer_auth(&s.token);
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        req.send()
    };
    let resp = open(None).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut events = sse(resp);
    let first = events.next_event().await;
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["metadata"]["name"], "a");
    let seen = first["revision"].as_i64().unwrap();
    drop(events);
    // Changes while nobody watches...
    s.ok(&["register", "b", "10.0.0.2", "80"]);
    s.ok(&["delete", "svc", "a"]);
    // ...are all delivered, in order, on resume.
    let mut events = sse(open(Some(seen)).await.unwrap());
    let e1 = events.next_event().await;
    let e2 = events.next_event().await;
    assert_eq!(
        (
            e1["type"].as_str(),
            e1["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    assert_eq!(
        (
            e2["type"].as_str(),
            e2["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("a"))
    );
    assert!(e1["revision"].as_i64() < e2["revision"].as_i64());

    let r = http
        .get(s.url("/api/v1/watch?revision=abc"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A Last-Event-ID this store never issued, at the edges of the integer range too, is
    // refused with one message, the current revision in it.
    let current = e2["revision"].as_i64().unwrap();
    for last in [
        (current + 1).to_string(),
        i64::MAX.to_string(),
        (i64::MAX as u64 + 1).to_string(),
        u64::MAX.to_string(),
        "-1".into(),
        "abc".into(),
    ] {
        let r = http
            .get(s.url("/api/v1/watch?kind=services"))
            .bearer_auth(&s.token)
            .header("last-event-id", &last)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{last}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v["error"]["message"],
            format!(
                "Last-Event-ID {last:?} is not a revision this store issued (it is at revision \
                 {current}): watch again without it to re-list"
            ),
            "{last}"
        );
    }
}

mod futures_lite {
    use serde_json::Value;

    pub struct Sse {
        resp: reqwest::Response,
        buf: String,
    }

    pub fn sse(resp: reqwest::Response) -> Sse {
        Sse {
            resp,
            buf: String::new(),
        }
    }

    impl Sse {
        /// The next event's data, parsed; fails the test after 10s.
        pub async fn next_event(&mut self) -> Value {
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                loop {
                    if let Some(end) = self.buf.find("\n\n") {
                        let block: String = self.buf.drain(..end + 2).collect();
                        if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                            return serde_json::from_str(data.trim()).unwrap();
                        }
                        continue;
                    }
                    let chunk = self.resp.chunk().await.unwrap().expect("stream ended");
                    self.buf.push_str(&String::from_utf8_lossy(&chunk));
                }
            })
            .await
            .expect("an event within 10s")
        }
    }
}
