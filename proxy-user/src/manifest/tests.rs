use super::*;

const SEED_000_SERVICE: &str = include_str!("../../tests/fixtures/seeds/000-proxy-service.yaml");
const SEED_000_SLICE: &str = include_str!("../../tests/fixtures/seeds/000-endpointslice.yaml");
const SEED_001: &str = include_str!("../../tests/fixtures/seeds/001-myapp-proxy.yaml");
const OBJECTS: &str = include_str!("../../tests/fixtures/objects.yaml");

fn load(files: &[(&str, &str)]) -> (Inventory, Vec<Diagnostic>) {
    let mut set = ManifestSet::default();
    for (path, text) in files {
        set.update_file_text(Path::new(path), text);
    }
    set.inventory()
}

fn rendered(diagnostics: &[Diagnostic]) -> Vec<String> {
    diagnostics
        .iter()
        .map(|d| format!("{}: {d}", d.severity))
        .collect()
}

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

#[test]
fn seed_001_reports_the_invalid_ip_and_the_broken_ingress_and_keeps_the_service() {
    let (inventory, diagnostics) = load(&[("manifests/001-myapp-proxy.yaml", SEED_001)]);
    assert_eq!(
        rendered(&diagnostics),
        [
            "error: manifests/001-myapp-proxy.yaml:1: Endpoints default/myapp-proxy: subsets[0].addresses[0].ip: \"2.3.4.5k\" is not an IP address; address ignored",
            "error: manifests/001-myapp-proxy.yaml:34: invalid YAML: did not find expected '-' indicator, while parsing a block collection (column 3); document ignored",
        ]
    );
    assert_eq!(
        diagnostics[0].origin,
        Origin::document("manifests/001-myapp-proxy.yaml", 1, 0)
    );
    assert_eq!(
        diagnostics[1].origin,
        Origin::document("manifests/001-myapp-proxy.yaml", 34, 2)
    );
    let service = &inventory.services[&key("default", "myapp-proxy")];
    assert_eq!(
        service.origin,
        Origin::document("manifests/001-myapp-proxy.yaml", 13, 1)
    );
    let spec = service.object.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.load_balancer_source_ranges,
        Some(vec!["1.2.3.4/32".to_owned()])
    );
    // The only address was invalid: nothing to mirror.
    assert!(inventory.slices.is_empty());
}

#[test]
fn seed_000_mirrors_the_endpoints_with_an_unnamed_port() {
    let (inventory, diagnostics) = load(&[
        ("m/000-endpointslice.yaml", SEED_000_SLICE),
        ("m/000-proxy-service.yaml", SEED_000_SERVICE),
    ]);
    assert_eq!(rendered(&diagnostics), Vec::<String>::new());
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("proxy-test", "proxy-service")]
    );
    assert_eq!(
        inventory.slices.keys().cloned().collect::<Vec<_>>(),
        [
            key("proxy-test", "proxy-service"),
            key("proxy-test", "proxy-service/mirror-0-ipv4")
        ]
    );
    let mirrored = &inventory.slices[&key("proxy-test", "proxy-service/mirror-0-ipv4")];
    assert_eq!(
        mirrored.mirrored_from.as_deref(),
        Some(&ObjectRef::new("Endpoints", "proxy-test", "proxy-service"))
    );
    assert_eq!(
        mirrored.origin,
        Origin::document("m/000-proxy-service.yaml", 13, 1)
    );
    let expected: SliceObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "proxy-service/mirror-0-ipv4",
            "namespace": "proxy-test",
            "labels": {
                "kubernetes.io/service-name": "proxy-service",
                "endpointslice.kubernetes.io/managed-by": "endpointslicemirroring-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "", "protocol": "TCP", "port": 80}],
        "endpoints": [{"addresses": ["10.240.0.129"], "conditions": {"ready": true}}],
    }))
    .expect("valid slice");
    assert_eq!(*mirrored.object, expected);
    // The hand-written slice keeps its port unnamed and its protocol unset.
    let manual = &inventory.slices[&key("proxy-test", "proxy-service")].object;
    let ports = manual.ports.as_ref().expect("ports");
    assert_eq!(
        (
            ports[0].name.as_deref(),
            ports[0].port,
            ports[0].protocol.as_deref()
        ),
        (None, Some(80), None)
    );
}

#[test]
fn objects_fixture_loads_everything_extproxy_reads() {
    let (inventory, diagnostics) = load(&[("objects.yaml", OBJECTS)]);
    assert_eq!(
        rendered(&diagnostics),
        [
            "info: objects.yaml:1: Namespace proxy-test: kind Namespace is not used by extproxy; ignored",
            "info: objects.yaml:5: Namespace shop: kind Namespace is not used by extproxy; ignored",
            "info: objects.yaml:9: Node node-a: kind Node is not used by extproxy; ignored",
        ]
    );
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [
            key("default", "httpbin-service"),
            key("default", "myapp-proxy"),
            key("proxy-test", "proxy-service"),
            key("shop", "legacy-db"),
            key("shop", "web"),
        ]
    );
    assert_eq!(
        inventory.slices.keys().cloned().collect::<Vec<_>>(),
        [
            key("default", "myapp-proxy/mirror-0-ipv4"),
            key("proxy-test", "proxy-service-abc12"),
            key("proxy-test", "proxy-service-def34"),
            key("shop", "legacy-db-1"),
        ]
    );
    // The comment line before a document is not its start.
    assert_eq!(
        inventory.services[&key("proxy-test", "proxy-service")].origin,
        Origin::document("objects.yaml", 16, 3)
    );
}

#[test]
fn a_malformed_document_does_not_hide_its_neighbours() {
    let text = "\
# leading comment
---
apiVersion: v1
kind: Service
metadata: {name: a}
--- # second
apiVersion: v1
kind: Service
metadata:
  name: [broken
---

---
apiVersion: v1
kind: Service
metadata: {name: c, namespace: ns}
...
";
    let (inventory, diagnostics) = load(&[("m.yaml", text)]);
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "a"), key("ns", "c")]
    );
    assert_eq!(
        inventory.services[&key("default", "a")].origin,
        Origin::document("m.yaml", 3, 0)
    );
    assert_eq!(
        inventory.services[&key("ns", "c")].origin,
        Origin::document("m.yaml", 14, 2)
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Error);
    assert_eq!(diagnostics[0].origin, Origin::document("m.yaml", 11, 1));
    assert!(
        diagnostics[0].message.starts_with("invalid YAML: "),
        "{}",
        diagnostics[0].message
    );
    assert!(
        !diagnostics[0].message.contains(" at line "),
        "{}",
        diagnostics[0].message
    );
}

#[test]
fn document_separators() {
    let cases = [
        ("---", true),
        ("---   ", true),
        ("--- # comment", true),
        ("---\t#x", true),
        ("----", false),
        ("--- a: b", false),
        (" ---", false),
        ("---#x", false),
    ];
    for (line, expected) in cases {
        assert_eq!(is_document_separator(line), expected, "{line:?}");
    }
}

#[test]
fn lists_work_in_yaml_and_json() {
    let yaml = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec: {ports: [{port: eighty}]}
";
    let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "s", "namespace": "x"}, "addressType": "IPv4", "endpoints": []}
    ]}"#;
    let (inventory, diagnostics) = load(&[("a.yaml", yaml), ("b.json", json)]);
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "a")]
    );
    assert_eq!(
        inventory.slices.keys().cloned().collect::<Vec<_>>(),
        [key("x", "s")]
    );
    assert_eq!(
        rendered(&diagnostics),
        [
            "info: a.yaml:1: Deployment d: items[1]: kind Deployment is not used by extproxy; ignored",
            "error: a.yaml:1: Service default/b: items[2].spec.ports[0].port: invalid type: string \"eighty\", expected i32; object ignored",
        ]
    );
}

#[test]
fn json_objects_and_json_errors() {
    let good = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}}"#;
    let bad = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\"\n  \"metadata\": {}\n}";
    let (inventory, diagnostics) = load(&[("good.json", good), ("bad.JSON", bad)]);
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "j")]
    );
    assert_eq!(
        rendered(&diagnostics),
        ["error: bad.JSON:4: invalid JSON: expected `,` or `}` (column 3); file ignored"]
    );
}

#[test]
fn known_kinds_need_the_right_api_version_and_a_name() {
    let cases = [
        (
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n",
            "error: m.yaml:1: EndpointSlice default/s: apiVersion: apiVersion discovery.k8s.io/v1beta1 is not supported for kind EndpointSlice: use apiVersion discovery.k8s.io/v1; object ignored",
        ),
        (
            "kind: Service\nmetadata: {name: s}\n",
            "error: m.yaml:1: Service default/s: apiVersion: apiVersion is missing: add apiVersion: v1; object ignored",
        ),
        (
            "apiVersion: v1\nkind: Endpoints\nmetadata: {namespace: x}\n",
            "error: m.yaml:1: Endpoints x/: metadata.name: metadata.name is missing: every object needs a name; object ignored",
        ),
        (
            "apiVersion: v1\nmetadata: {name: s}\n",
            "error: m.yaml:1: kind: kind is missing: every object needs a kind (Service, EndpointSlice or Endpoints)",
        ),
        (
            "just some prose pasted from an article\n",
            "error: m.yaml:1: not a Kubernetes object: expected a mapping with apiVersion, kind and metadata",
        ),
        (
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\nsubsets: [{addresses: [{hostname: h}]}]\n",
            // k8s-openapi reads a missing required string as "".
            "error: m.yaml:1: Endpoints default/e: subsets[0].addresses[0].ip: \"\" is not an IP address; address ignored",
        ),
    ];
    for (text, expected) in cases {
        let (inventory, diagnostics) = load(&[("m.yaml", text)]);
        assert_eq!(rendered(&diagnostics), [expected], "{text}");
        assert!(
            inventory.services.is_empty() && inventory.slices.is_empty(),
            "{text}"
        );
    }
}

#[test]
fn duplicates_keep_the_first_by_path_then_document() {
    let one = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 1}]}\n";
    let two = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {ports: [{port: 2}]}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: s}\n";
    // Inserted in reverse order: path order decides, not arrival order.
    let (inventory, diagnostics) = load(&[("m/b.yaml", two), ("m/a.yaml", one)]);
    assert_eq!(
        rendered(&diagnostics),
        [
            "error: m/b.yaml:1: Service default/s: defined twice: this definition is ignored, the first one (m/a.yaml:1) is used"
        ]
    );
    let spec = inventory.services[&key("default", "s")]
        .object
        .spec
        .as_ref()
        .expect("spec");
    assert_eq!(spec.ports.as_ref().expect("ports")[0].port, 1);
    // Same name, other kind: not a duplicate.
    let (_, diagnostics) = load(&[("m/b.yaml", two)]);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
}

#[test]
fn endpoints_mirroring_splits_by_ports_and_family() {
    let text = "\
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: shop}
subsets:
- addresses: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]
  notReadyAddresses: [{ip: 10.0.0.2}, {ip: nope}]
  ports: [{name: pg, port: 5432}, {name: m, port: 9187, protocol: UDP}]
- addresses: [{ip: 10.0.0.3}]
  ports: [{name: m, port: 9187, protocol: UDP}, {name: pg, port: 5432, protocol: TCP}]
- addresses: [{ip: 10.0.0.4}]
  ports: [{port: 0}, {port: 80}]
";
    let (inventory, diagnostics) = load(&[("e.yaml", text)]);
    assert_eq!(
        rendered(&diagnostics),
        [
            "error: e.yaml:1: Endpoints shop/db: subsets[0].notReadyAddresses[1].ip: \"nope\" is not an IP address; address ignored",
            "error: e.yaml:1: Endpoints shop/db: subsets[2].ports[0].port: port 0 is out of range 1-65535; port ignored",
        ]
    );
    type Ports = Vec<(String, i32, String)>;
    type Endpoints = Vec<(String, bool)>;
    let summary: Vec<(String, String, Ports, Endpoints)> = inventory
        .slices
        .iter()
        .map(|(k, s)| {
            let slice = &s.object;
            let ports = slice
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    (
                        p.name.clone().unwrap_or_default(),
                        p.port.unwrap_or_default(),
                        p.protocol.clone().unwrap_or_default(),
                    )
                })
                .collect();
            let endpoints = slice
                .endpoints
                .iter()
                .map(|e| {
                    let ready = e
                        .conditions
                        .as_ref()
                        .and_then(|c| c.ready)
                        .unwrap_or_default();
                    (e.addresses[0].clone(), ready)
                })
                .collect();
            (
                k.name.to_string(),
                slice.address_type.clone(),
                ports,
                endpoints,
            )
        })
        .collect();
    let pg_m = vec![
        ("m".to_owned(), 9187, "UDP".to_owned()),
        ("pg".to_owned(), 5432, "TCP".to_owned()),
    ];
    assert_eq!(
        summary,
        [
            (
                "db/mirror-0-ipv4".to_owned(),
                "IPv4".to_owned(),
                pg_m.clone(),
                vec![
                    ("10.0.0.1".to_owned(), true),
                    ("10.0.0.2".to_owned(), false),
                    ("10.0.0.3".to_owned(), true),
                ]
            ),
            (
                "db/mirror-0-ipv6".to_owned(),
                "IPv6".to_owned(),
                pg_m,
                vec![("fd00::1".to_owned(), true)]
            ),
            (
                "db/mirror-1-ipv4".to_owned(),
                "IPv4".to_owned(),
                vec![(String::new(), 80, "TCP".to_owned())],
                vec![("10.0.0.4".to_owned(), true)]
            ),
        ]
    );
}

#[test]
fn skip_mirror_endpoints_are_not_used() {
    let text = "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: e\n  labels: {endpointslice.kubernetes.io/skip-mirror: \"true\"}\nsubsets: [{addresses: [{ip: 10.0.0.1}], ports: [{port: 80}]}]\n";
    let (inventory, diagnostics) = load(&[("e.yaml", text)]);
    assert!(inventory.slices.is_empty());
    assert_eq!(
        rendered(&diagnostics),
        [
            "info: e.yaml:1: Endpoints default/e: metadata.labels[endpointslice.kubernetes.io/skip-mirror]: not mirrored to an EndpointSlice (skip-mirror is true), so extproxy does not use these endpoints"
        ]
    );
}

#[test]
fn manifest_file_names() {
    let cases = [
        ("a.yaml", true),
        ("a.yml", true),
        ("a.json", true),
        ("A.YAML", true),
        ("dir/b.yaml", true),
        (".a.yaml", false),
        (".a.yaml.swp", false),
        ("a.yaml~", false),
        ("#a.yaml#", false),
        (".#a.yaml", false),
        ("a.txt", false),
        ("yaml", false),
    ];
    for (name, expected) in cases {
        assert_eq!(
            ManifestSet::is_manifest_path(Path::new(name)),
            expected,
            "{name}"
        );
    }
}

#[test]
fn directory_loading_and_per_file_updates() {
    let dir = std::env::temp_dir().join(format!("extproxy-manifest-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let service =
        |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n");
    std::fs::write(dir.join("a.yaml"), service("a")).expect("write");
    std::fs::write(dir.join(".a.yaml.swp"), "garbage: [").expect("write");
    std::fs::write(dir.join("b.yaml~"), "garbage: [").expect("write");
    std::fs::write(dir.join("notes.txt"), "garbage: [").expect("write");

    let (inventory, diagnostics) = load_dir(&dir);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "a")]
    );

    let mut set = ManifestSet::read_dir(&dir).expect("read dir");
    std::fs::write(dir.join("b.yml"), service("b")).expect("write");
    assert!(set.update_file(&dir.join("b.yml")));
    assert!(!set.update_file(&dir.join("b.yaml~")));
    let (inventory, _) = set.inventory();
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "a"), key("default", "b")]
    );
    std::fs::remove_file(dir.join("a.yaml")).expect("remove");
    assert!(
        set.update_file(&dir.join("a.yaml")),
        "a vanished file is removed"
    );
    assert_eq!(
        set.files().collect::<Vec<_>>(),
        [dir.join("b.yml").as_path()]
    );
    assert!(set.remove_file(&dir.join("b.yml")));
    assert!(set.inventory().0.services.is_empty());
    std::fs::remove_dir_all(&dir).expect("cleanup");

    let (inventory, diagnostics) = load_dir(&dir);
    assert!(inventory.services.is_empty());
    assert_eq!(diagnostics.len(), 1);
    assert!(
        diagnostics[0]
            .message
            .starts_with("cannot read manifest directory"),
        "{}",
        diagnostics[0].message
    );
}

#[test]
fn parser_positions_are_stripped() {
    assert_eq!(
        strip_position("did not find x at line 3 column 4, while parsing y at line 1 column 1"),
        "did not find x, while parsing y"
    );
    assert_eq!(
        strip_position("look at this at position 17"),
        "look at this"
    );
    assert_eq!(strip_position("nothing at all"), "nothing at all");
}

/// Files coming, changing and going, with duplicates, mirrored Endpoints and broken documents:
/// feeding an incremental translator gives what translating the whole set gives.
#[test]
fn feeding_changes_equals_translating_the_whole_set() {
    use crate::translate::{NodeInfo, Settings, translate};
    let settings = Settings {
        egress_v4: vec!["192.0.2.100".parse().unwrap()],
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        fill_missing: true,
        ..Settings::default()
    };
    let node = NodeInfo {
        addresses: vec!["10.240.0.10".parse().unwrap()],
    };
    let service = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80}}]\n{extra}"
        )
    };
    let endpoints = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{port: 8080}}]\n"
        )
    };
    let steps: Vec<(&str, Option<String>)> = vec![
        ("a.yaml", Some(service("web", ""))),
        (
            "b.yaml",
            Some(format!(
                "{}---\n{}",
                endpoints("web", "10.1.0.1"),
                service("db", "")
            )),
        ),
        // A second definition of web: ignored while a.yaml has the first.
        (
            "c.yaml",
            Some(service("web", "  externalIPs: [192.0.2.7]\n")),
        ),
        ("b.yaml", Some(endpoints("web", "10.1.0.2k"))),
        ("a.yaml", None),
        ("d.yaml", Some("kind: [broken\n".to_owned())),
        ("b.yaml", Some(endpoints("web", "10.1.0.3"))),
        (
            "c.yaml",
            Some(service("web", "  externalIPs: [192.0.2.8]\n")),
        ),
        ("d.yaml", None),
        ("b.yaml", None),
    ];
    let mut set = ManifestSet::default();
    let mut translator = Incremental::new(node.clone(), settings.clone());
    for (i, (path, text)) in steps.into_iter().enumerate() {
        match text {
            Some(text) => set.update_file_text(Path::new(path), &text),
            None => {
                set.remove_file(Path::new(path));
            }
        }
        set.feed(&mut translator);
        let got = translator.update().clone();
        let (inventory, mut want_diagnostics) = set.inventory();
        let want = translate(&inventory, &node, &settings);
        want_diagnostics.extend(want.diagnostics);
        assert_eq!(got.desired, want.desired, "step {i}");
        assert_eq!(
            rendered(&got.diagnostics),
            rendered(&want_diagnostics),
            "step {i}"
        );
    }
}

/// `'a: ' + '[' * 200000` stalled the agent for 72 s: the YAML parser's time grows with the
/// square of the nesting. The pre-scan refuses it first, naming the limit and the line.
#[test]
fn deep_nesting_is_refused_before_parsing() {
    let deep = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\n---\nb: 1\na: {}{}\n",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let (inventory, diagnostics) = load(&[("m/x.yaml", &deep)]);
    assert_eq!(
        rendered(&diagnostics),
        [format!(
            "error: m/x.yaml:6: nested more than {MAX_NESTING} levels deep, the most extproxy reads (Kubernetes objects need far fewer); document ignored"
        )]
    );
    // The other document of the file is served.
    assert_eq!(inventory.services.len(), 1);
    let fine = format!("a: {}{}\n", "[".repeat(40), "]".repeat(40));
    assert!(
        !rendered(&load(&[("m/y.yaml", &fine)]).1)[0].contains("levels deep"),
        "40 levels are read"
    );
}

#[test]
fn file_document_and_count_limits_are_named() {
    let service =
        |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n");
    // A document over MAX_DOCUMENT_BYTES is refused; the file's other documents are not.
    let big = format!(
        "{}---\nkind: Service\nmetadata:\n  annotations:\n    x: \"{}\"\n",
        service("a"),
        "x".repeat(MAX_DOCUMENT_BYTES)
    );
    let (inventory, diagnostics) = load(&[("m/big.yaml", &big)]);
    assert_eq!(
        rendered(&diagnostics),
        [
            "error: m/big.yaml:5: the document is 1024 KiB, more than the 1024 KiB extproxy reads of one YAML document; document ignored (split a long list into several documents)"
        ]
    );
    assert_eq!(inventory.services.len(), 1);

    // Documents after the MAX_DOCUMENTS-th are not read.
    let many: String = (0..MAX_DOCUMENTS + 10)
        .map(|i| format!("{}---\n", service(&format!("s{i}"))))
        .collect();
    let (inventory, diagnostics) = load(&[("m/many.yaml", &many)]);
    assert_eq!(inventory.services.len(), MAX_DOCUMENTS);
    assert_eq!(
        rendered(&diagnostics),
        [format!(
            "error: m/many.yaml:{}: more than {MAX_DOCUMENTS} documents, the most extproxy reads of one file; this one and the rest of the file are ignored (split it into several files)",
            4 * MAX_DOCUMENTS + 1
        )]
    );

    // A file over MAX_FILE_BYTES is not even read.
    let dir = std::env::temp_dir().join(format!("extproxy-big-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = std::fs::File::create(dir.join("huge.yaml")).expect("create");
    file.set_len(MAX_FILE_BYTES + 1).expect("grow");
    std::fs::write(dir.join("ok.yaml"), service("ok")).expect("write");
    let (inventory, diagnostics) = load_dir(&dir);
    assert_eq!(
        rendered(&diagnostics),
        [format!(
            "error: {}: the file is 4.0 MiB, more than the 4 MiB extproxy reads of one manifest file; file ignored (split it into several files)",
            dir.join("huge.yaml").display()
        )]
    );
    assert_eq!(inventory.services.len(), 1);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Editors on Windows save UTF-8 with a byte order mark; the first document failed with "more
/// than one document is not supported".
#[test]
fn a_byte_order_mark_is_skipped() {
    let text = "\u{feff}apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n";
    let (inventory, diagnostics) = load(&[("m/bom.yaml", text)]);
    assert!(diagnostics.is_empty(), "{:?}", rendered(&diagnostics));
    assert_eq!(inventory.services.len(), 2);
    let json =
        "\u{feff}{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"c\"}}";
    let (inventory, diagnostics) = load(&[("m/bom.json", json)]);
    assert!(diagnostics.is_empty(), "{:?}", rendered(&diagnostics));
    assert_eq!(inventory.services.len(), 1);
}

/// A symlink loop in the folder was skipped without a word by `run` and `validate`.
#[test]
fn symlink_loops_are_reported() {
    use std::os::unix::fs::symlink;
    let dir = std::env::temp_dir().join(format!("extproxy-loops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    symlink("b.yaml", dir.join("a.yaml")).expect("link");
    symlink("a.yaml", dir.join("b.yaml")).expect("link");
    symlink("self.yaml", dir.join("self.yaml")).expect("link");
    std::fs::write(
        dir.join("ok.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n",
    )
    .expect("write");
    let (inventory, diagnostics) = load_dir(&dir);
    let at = |name: &str| dir.join(name).display().to_string();
    assert_eq!(
        rendered(&diagnostics),
        [
            format!(
                "error: {}: a symbolic link that leads back to itself ({} -> b.yaml -> a.yaml); file ignored",
                at("a.yaml"),
                at("a.yaml")
            ),
            format!(
                "error: {}: a symbolic link that leads back to itself ({} -> a.yaml -> b.yaml); file ignored",
                at("b.yaml"),
                at("b.yaml")
            ),
            format!(
                "error: {}: a symbolic link that leads back to itself ({} -> self.yaml); file ignored",
                at("self.yaml"),
                at("self.yaml")
            ),
        ]
    );
    assert_eq!(inventory.services.len(), 1);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A name of 100,000 characters was accepted (the API server caps names at 63 or 253) and
/// repeated in every line about the object. Names are validated as the API server does, and a
/// refused one is said cut short.
#[test]
fn names_are_validated_like_the_api_server_does() {
    let long = "a".repeat(100_000);
    let object = |kind: &str, api: &str, namespace: &str, name: &str| {
        format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        )
    };
    let files = [
        object("Service", "v1", "default", &long),
        object("Service", "v1", "default", "9lives"),
        object("Service", "v1", "Default", "ok"),
        object("EndpointSlice", "discovery.k8s.io/v1", "default", "web-1.x"),
        object("Endpoints", "v1", "default", "Web_1"),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: labelled\n  labels: {{kubernetes.io/service-name: {long}}}\naddressType: IPv4\nendpoints: []\n"
        ),
        object("Service", "v1", "default", "fine-1"),
    ]
    .join("---\n");
    let (inventory, diagnostics) = load(&[("m.yaml", &files)]);
    let short = format!("{}...(100000 characters)", "a".repeat(43));
    assert_eq!(
        rendered(&diagnostics),
        [
            format!("error: m.yaml:1: Service default/{short}: metadata.name: \"{short}\" is not a valid Service name: at most 63 characters, not 100000, lower case letters, digits and '-', starting with a letter and ending with a letter or digit (the API server refuses it too); object ignored"),
            "error: m.yaml:5: Service default/9lives: metadata.name: \"9lives\" is not a valid Service name: at most 63 characters, lower case letters, digits and '-', starting with a letter and ending with a letter or digit (the API server refuses it too); object ignored".to_owned(),
            "error: m.yaml:9: Service Default/ok: metadata.namespace: \"Default\" is not a valid namespace: at most 63 characters, lower case letters, digits and '-', starting and ending with a letter or digit (the API server refuses it too); object ignored".to_owned(),
            "error: m.yaml:17: Endpoints default/Web_1: metadata.name: \"Web_1\" is not a valid Endpoints name: at most 253 characters, lower case letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit (the API server refuses it too); object ignored".to_owned(),
            format!("error: m.yaml:21: EndpointSlice default/labelled: metadata.labels[kubernetes.io/service-name]: \"{short}\" cannot be the name of a Service (at most 63 characters, lower case letters, digits and '-', starting with a letter and ending with a letter or digit); object ignored"),
        ]
    );
    assert!(diagnostics.iter().all(|d| d.to_string().len() < 600));
    assert_eq!(
        inventory.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "fine-1")]
    );
    assert_eq!(
        inventory.slices.keys().cloned().collect::<Vec<_>>(),
        [key("default", "web-1.x")]
    );
}
