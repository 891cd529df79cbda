//! VirtualService and DestinationRule as Istio users write them: accepted whole, and every bad
//! field refused with its path and value.

use isthmus_model::*;

fn err(yaml: &str) -> String {
    parse_documents(yaml).unwrap_err().to_string()
}

const REVIEWS_VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v3}
      weight: 10
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,connect-failure,503"}
    fault:
      abort: {percentage: {value: 0.1}, httpStatus: 503}
      delay: {percentage: {value: 1}, fixedDelay: 7s}
    headers:
      request: {set: {x-mesh: isthmus}, remove: [x-debug]}
"#;

const REVIEWS_DR: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {http: {http1MaxPendingRequests: 10, http2MaxRequests: 100, maxRetries: 3}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}}
  - {name: v3, labels: {version: v3}}
"#;

#[test]
fn istio_virtual_service_and_destination_rule_parse() {
    let rs = parse_documents(&format!("{REVIEWS_VS}---{REVIEWS_DR}")).unwrap();
    let Resource::VirtualService(vs) = &rs[0] else {
        panic!("not a VirtualService")
    };
    assert_eq!(vs.spec.http.len(), 2);
    assert_eq!(
        vs.spec.http[0].matches[0].headers["end-user"]
            .exact
            .as_deref(),
        Some("jason")
    );
    assert_eq!(vs.spec.http[1].route[1].weight, Some(10));
    let Resource::DestinationRule(dr) = &rs[1] else {
        panic!("not a DestinationRule")
    };
    assert_eq!(dr.spec.subsets.len(), 3);
    assert_eq!("vs".parse::<Kind>().unwrap(), Kind::VirtualService);
    assert_eq!("dr".parse::<Kind>().unwrap(), Kind::DestinationRule);
    // JSON round trip keeps everything.
    let back: Resource = serde_json::from_slice(&rs[0].to_json()).unwrap();
    assert_eq!(back, rs[0]);
}

#[test]
fn bad_virtual_services_name_the_field_and_value() {
    let cases = [
        // weights not adding up
        (
            "weight: 90\n    - destination: {host: reviews, subset: v3}\n      weight: 20",
            "spec.http[1].route[*].weight: \"[90, 20] = 110\" must add up to 100",
        ),
    ];
    for (replacement, want) in cases {
        let yaml = REVIEWS_VS.replace(
            "weight: 90\n    - destination: {host: reviews, subset: v3}\n      weight: 10",
            replacement,
        );
        let e = err(&yaml);
        assert!(e.contains(want), "{e}");
    }
    let e = err(&REVIEWS_VS.replace("{prefix: /reviews}", "{regex: \"/re(views\"}"));
    assert!(
        e.contains(
            "spec.http[0].match[0].uri.regex: \"/re(views\" is not a valid regular expression"
        ),
        "{e}"
    );
    let e = err(&REVIEWS_VS.replace("timeout: 2s", "timeout: 2 seconds"));
    assert!(e.contains("spec.http[1].timeout: \"2 seconds\""), "{e}");
    let e = err(&REVIEWS_VS.replace("5xx,connect-failure,503", "5xx,sometimes"));
    assert!(
        e.contains("spec.http[1].retries.retryOn: \"sometimes\" is not a retry condition"),
        "{e}"
    );
    let e = err(&REVIEWS_VS.replace("value: 0.1", "value: 150"));
    assert!(
        e.contains("spec.http[1].fault.abort.percentage.value: \"150\" must be 0 to 100"),
        "{e}"
    );
    let e = err(&REVIEWS_VS.replace("name: jason", "name: jason\n    tcpRoute: []"));
    assert!(e.contains("tcpRoute") && e.contains("unknown field"), "{e}");
    let e = err(&REVIEWS_VS.replace("hosts: [reviews]", "hosts: ['*.example.com']"));
    assert!(e.contains("spec.hosts[0]") && e.contains("wildcard"), "{e}");
    let e = err(&REVIEWS_VS.replace("{exact: jason}", "{exact: jason, prefix: j}"));
    assert!(
        e.contains("spec.http[0].match[0].headers[end-user]") && e.contains("exactly one"),
        "{e}"
    );
}

#[test]
fn bad_destination_rules_name_the_field_and_value() {
    let e = err(&REVIEWS_DR.replace("LEAST_REQUEST", "FASTEST"));
    assert!(
        e.contains("spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" must be"),
        "{e}"
    );
    let e = err(&REVIEWS_DR.replace("{name: v3,", "{name: v1,"));
    assert!(
        e.contains("spec.subsets[2].name: \"v1\" is given twice"),
        "{e}"
    );
    let e = err(&REVIEWS_DR.replace("maxEjectionPercent: 50", "maxEjectionPercent: 500"));
    assert!(
        e.contains("spec.trafficPolicy.outlierDetection.maxEjectionPercent: \"500\""),
        "{e}"
    );
    let e = err(&REVIEWS_DR.replace("baseEjectionTime: 30s", "baseEjectionTime: 30sec"));
    assert!(
        e.contains(
            "spec.trafficPolicy.outlierDetection.baseEjectionTime: \"30sec\" has unknown unit"
        ),
        "{e}"
    );
}
