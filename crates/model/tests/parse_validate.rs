use isthmus_model::*;

fn err(yaml: &str) -> String {
    parse_documents(yaml).unwrap_err().to_string()
}

const SVC: &str = r#"
apiVersion: isthmus.io/v1
kind: Service
metadata: {name: productpage, namespace: bookinfo, labels: {app: productpage}}
spec:
  selector: {app: productpage}
  ports:
  - {name: http, port: 9080, protocol: HTTP}
"#;

#[test]
fn parses_multi_document_yaml_of_every_kind_and_defaults_namespace() {
    let text = format!(
        "{SVC}---\n{}---\n{}",
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1}
spec: {address: 10.0.0.5, ports: {http: 8080}, labels: {app: productpage}, serviceAccount: bookinfo-productpage}
"#,
        r#"apiVersion: networking.istio.io/v1beta1
kind: WorkloadGroup
metadata: {name: reviews, namespace: bookinfo}
spec:
  metadata: {labels: {app: reviews}}
  template: {serviceAccount: reviews, ports: {http: 9080}}
  probe: {periodSeconds: 5, httpGet: {path: /ready, port: 9080}}
"#
    );
    let rs = parse_documents(&text).unwrap();
    assert_eq!(rs.len(), 3);
    assert_eq!(rs[0].kind(), Kind::Service);
    assert_eq!(rs[1].meta().namespace, "default");
    assert_eq!(rs[2].kind(), Kind::WorkloadGroup);
    let Resource::Service(svc) = &rs[0] else {
        panic!()
    };
    assert_eq!(
        svc.hostname("cluster.local"),
        "productpage.bookinfo.svc.cluster.local"
    );
}

#[test]
fn json_round_trips() {
    let r = parse_documents(SVC).unwrap().remove(0);
    let again = parse_json(&r.to_json()).unwrap();
    assert_eq!(r, again);
}

#[test]
fn broken_yaml_names_document_and_position() {
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
    assert!(e.starts_with("document 1: not valid YAML or JSON"), "{e}");
    let e = err(&format!("{SVC}---\nkind: [\n"));
    assert!(e.starts_with("document 2: not valid YAML or JSON"), "{e}");
}

#[test]
fn unknown_kind_and_api_version() {
    let e = err("apiVersion: isthmus.io/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n");
    assert_eq!(
        e,
        "document 1: kind: unknown kind \"Deployment\" (expected Service, WorkloadEntry, \
         WorkloadGroup, AuthorizationPolicy, PeerAuthentication, VirtualService, DestinationRule, HTTPRoute, GRPCRoute)"
    );
    let e = err("apiVersion: apps/v1\nkind: Service\nmetadata: {name: x}\nspec: {}\n");
    assert!(
        e.contains("apiVersion: \"apps/v1\" is not an apiVersion of Service"),
        "{e}"
    );
    let e = err("kind: Service\nmetadata: {name: x}\nspec: {}\n");
    assert!(e.contains("apiVersion: missing"), "{e}");
}

#[test]
fn unknown_fields_and_wrong_types_name_the_path() {
    let e = err(&SVC.replace("protocol: HTTP", "protocol: HTTP, colour: red"));
    assert!(
        e.contains("spec.ports[0]") && e.contains("unknown field `colour`"),
        "{e}"
    );
    let e = err(&SVC.replace("port: 9080", "port: lots"));
    assert!(
        e.contains("spec.ports[0].port") && e.contains("invalid type"),
        "{e}"
    );
    let e = err(&SVC.replace("namespace: bookinfo,", "namespace: bookinfo, owner: me,"));
    assert!(
        e.contains("metadata") && e.contains("unknown field `owner`"),
        "{e}"
    );
}

#[test]
fn validation_names_field_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "name: productpage",
            "name: Product_Page",
            "metadata.name: \"Product_Page\" must consist of lower-case",
        ),
        (
            "namespace: bookinfo",
            "namespace: -bad",
            "metadata.namespace: \"-bad\" must start and end",
        ),
        (
            "port: 9080",
            "port: 70000",
            "spec.ports[0].port: \"70000\" is out of range; a port is 1 to 65535",
        ),
        (
            "port: 9080",
            "port: 0",
            "spec.ports[0].port: \"0\" is out of range",
        ),
        (
            "protocol: HTTP",
            "protocol: SMTP",
            "spec.ports[0].protocol: \"SMTP\" is not a known protocol",
        ),
        (
            "selector: {app: productpage}",
            "selector: {\"bad key\": x}",
            "spec.selector[bad key]: \"bad key\" label key",
        ),
    ];
    for (from, to, want) in cases {
        let e = err(&SVC.replace(from, to));
        assert!(e.contains(want), "{to}: got {e}");
        assert!(
            e.contains("Service bookinfo/") || e.contains("Service -bad/"),
            "{e}"
        );
    }
}

#[test]
fn duplicate_port_names_and_numbers() {
    let y = SVC.replace(
        "  - {name: http, port: 9080, protocol: HTTP}",
        "  - {name: http, port: 9080}\n  - {name: http, port: 9081}\n  - {name: grpc, port: 9080}",
    );
    let e = err(&y);
    assert!(
        e.contains("spec.ports[1].name: \"http\" is used by another port"),
        "{e}"
    );
    assert!(
        e.contains("spec.ports[2].port: \"9080\" is used by another port"),
        "{e}"
    );
}

#[test]
fn workload_entry_address_and_group_probe() {
    let e = err("apiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec: {address: 10.0.0.300}\n");
    assert!(
        e.contains("spec.address: \"10.0.0.300\" is not an IPv4 or IPv6 address"),
        "{e}"
    );
    let ok = "apiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec: {address: \"fd00::5\"}\n";
    assert!(parse_documents(ok).is_ok());
    let e = err("apiVersion: isthmus.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {probe: {periodSeconds: 5}}\n");
    assert!(
        e.contains("spec.probe: \"\" must have exactly one of httpGet or tcpSocket"),
        "{e}"
    );
    let e = err("apiVersion: isthmus.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {probe: {periodSeconds: 1, timeoutSeconds: 5, tcpSocket: {port: 99999}}}\n");
    assert!(
        e.contains("spec.probe.tcpSocket.port: \"99999\" is out of range"),
        "{e}"
    );
    assert!(
        e.contains("spec.probe.timeoutSeconds: \"5\" must not exceed periodSeconds (1)"),
        "{e}"
    );
}

#[test]
fn empty_input_is_an_error() {
    assert_eq!(err("---\n---\n"), "no resources found in the input");
}

#[test]
fn selection_by_labels_and_explicit_attachment() {
    let rs = parse_documents(&format!(
        "{SVC}---\napiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {{name: a, namespace: bookinfo}}\nspec: {{address: 10.0.0.1, labels: {{app: productpage}}}}\n---\napiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {{name: b, namespace: bookinfo}}\nspec: {{address: 10.0.0.2, services: [productpage]}}\n---\napiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {{name: c, namespace: other}}\nspec: {{address: 10.0.0.3, labels: {{app: productpage}}}}\n"
    ))
    .unwrap();
    let Resource::Service(svc) = &rs[0] else {
        panic!()
    };
    let serves: Vec<bool> = rs[1..]
        .iter()
        .map(|r| match r {
            Resource::WorkloadEntry(w) => w.serves(svc),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(serves, [true, true, false]);
}

#[test]
fn kind_names_and_port_guesses() {
    assert_eq!("svc".parse::<Kind>().unwrap(), Kind::Service);
    assert_eq!("workloads".parse::<Kind>().unwrap(), Kind::WorkloadEntry);
    assert_eq!("wg".parse::<Kind>().unwrap(), Kind::WorkloadGroup);
    assert_eq!(
        "pods".parse::<Kind>().unwrap_err().to_string(),
        "unknown kind \"pods\"; the kinds are services (service, svc), workloadentries \
         (workloadentry, workload, workloads, we), workloadgroups (workloadgroup, group, groups, \
         wg), authorizationpolicies (authorizationpolicy, policy, policies, ap), \
         peerauthentications (peerauthentication, pa), virtualservices (virtualservice, vs), destinationrules (destinationrule, dr), httproutes (httproute), grpcroutes (grpcroute)"
    );
    for kind in Kind::ALL {
        for name in kind
            .aliases()
            .iter()
            .chain([&kind.plural(), &kind.as_str()])
        {
            assert_eq!(name.parse::<Kind>().unwrap(), kind, "{name}");
        }
    }
    assert_eq!(guess_port_name(3306), "mysql");
    assert_eq!(guess_port_name(8080), "http");
    assert_eq!(guess_port_name(443), "https");
    assert_eq!(guess_port_name(9999), "9999");
}

proptest::proptest! {
    /// The fuzz target's property, run in every test run: arbitrary text never panics the
    /// parser, and whatever parses validates and round-trips through JSON.
    #[test]
    fn arbitrary_text_never_panics_and_parsed_input_round_trips(text in ".{0,400}") {
        if let Ok(resources) = parse_documents(&text) {
            for r in resources {
                proptest::prop_assert!(validate(&r).is_ok());
                proptest::prop_assert_eq!(parse_json(&r.to_json()).unwrap(), r);
            }
        }
        let _ = LabelSelector::parse(&text);
    }

    #[test]
    fn mutated_documents_never_panic(cut in 0usize..300, byte in proptest::prelude::any::<u8>()) {
        let mut doc = SVC.as_bytes().to_vec();
        let at = cut.min(doc.len() - 1);
        doc[at] = byte;
        if let Ok(text) = std::str::from_utf8(&doc) {
            let _ = parse_documents(text);
        }
    }
}

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mysql-clients, namespace: onprem}
spec:
  selector: {matchLabels: {app: mysql}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/bookinfo/sa/*"], ipBlocks: [10.0.0.0/8]}
    to:
    - operation: {ports: ["3306"]}
"#;

#[test]
fn authorization_policies_parse_and_validate() {
    let r = parse_documents(POLICY).unwrap().remove(0);
    let Resource::AuthorizationPolicy(p) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(p.spec.action(), "ALLOW");
    assert_eq!(
        p.spec.rules[0].from[0].source.principals,
        ["cluster.local/ns/bookinfo/sa/*"]
    );
    assert_eq!("ap".parse::<Kind>().unwrap(), Kind::AuthorizationPolicy);
    let cases: &[(&str, &str, &str)] = &[
        (
            "action: ALLOW",
            "action: AUDIT",
            "spec.action: \"AUDIT\" is not supported",
        ),
        (
            "action: ALLOW",
            "action: MAYBE",
            "spec.action: \"MAYBE\" must be ALLOW or DENY",
        ),
        (
            "ports: [\"3306\"]",
            "ports: [\"mysql\"]",
            "spec.rules[0].to[0].operation.ports: \"mysql\" is not a port",
        ),
        (
            "ipBlocks: [10.0.0.0/8]",
            "ipBlocks: [10.0.0.0/33]",
            "spec.rules[0].from[0].source.ipBlocks: \"10.0.0.0/33\" is not an IP",
        ),
        (
            "sa/*\"]",
            "s*a\"]",
            "must be non-empty, with `*` only at the start or the end",
        ),
    ];
    for (from, to, want) in cases {
        let e = err(&POLICY.replace(from, to));
        assert!(e.contains(want), "{to}: got {e}");
    }
    let e = err(&POLICY.replace("source:", "sauce:"));
    assert!(e.contains("unknown field `sauce`"), "{e}");
}

#[test]
fn peer_authentications_parse_and_validate() {
    let doc = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n";
    let r = parse_documents(doc).unwrap().remove(0);
    let Resource::PeerAuthentication(p) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(p.spec.mode(), "STRICT");
    assert_eq!("pa".parse::<Kind>().unwrap(), Kind::PeerAuthentication);
    let e = err(&doc.replace("STRICT", "DISABLE"));
    assert!(
        e.contains("spec.mtls.mode: \"DISABLE\" is not supported"),
        "{e}"
    );
    let e = err(&doc.replace("STRICT", "LOOSE"));
    assert!(e.contains("must be STRICT, PERMISSIVE or UNSET"), "{e}");
    let e = err(&doc.replace("{mode: STRICT}", "{mode: STRICT}, portLevelMtls: {}"));
    assert!(e.contains("unknown field `portLevelMtls`"), "{e}");
}
