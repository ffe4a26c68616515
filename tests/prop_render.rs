//! Property tests of the render path (the same builders the controller runs):
//!
//! - `accepted_specs_render_deterministically_and_safely`: RegistryMirrors generated field by
//!   field from the CRD schema's shapes (names, registries, URLs, storage kinds, edge, cleanup,
//!   node config, Secrets), seeded with the values of `config/samples`. Each goes through the same
//!   off-cluster admission check `tests/invalid_specs.rs` uses (OpenAPI + CEL); what the schema
//!   accepts must render without a panic, twice to the same bytes (manifests with Secret data, and
//!   every raw file), every pod restricted (the node agent's exception as narrow as in
//!   `tests/render_invariants.rs`), and no generated credential in a non-Secret object or file.
//!   What the operator refuses beyond the schema must be an error naming a field path.
//! - `any_yaml_text_renders_or_errors`: arbitrary text and mutations of the samples and of the
//!   corpus in `tests/fuzz_corpus/render_yaml/`; `render` returns output or an error, never
//!   panics, and is deterministic either way.
//!
//! `make test` runs a few dozen cases of each. `make fuzz` runs each for `MIRRORFLEET_FUZZ_SECONDS`
//! with fresh seeds and prints the case counts. Failing inputs are kept (shrunk) as seeds in
//! `tests/prop_regressions/` and replayed first on every run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use base64::Engine;
use mirrorfleet::render::{render_str, to_yaml_stream, Rendered};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestError, TestRng, TestRunner};
use serde_json::{json, Value};

// ---------------------------------------------------------------- running

/// Runs `test` over `strategy`: one batch of `PROPTEST_CASES` (default `default_cases`), or, with
/// `MIRRORFLEET_FUZZ_SECONDS`, batches with fresh seeds until the time is up. Returns the cases run.
fn run<S: Strategy>(name: &str, default_cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let budget = std::env::var("MIRRORFLEET_FUZZ_SECONDS").ok().and_then(|s| s.parse::<u64>().ok());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default_cases);
    let config = |cases: u32| Config {
        cases,
        max_shrink_iters: 4096,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(leak(format!(
            "{}/tests/prop_regressions/{name}.txt",
            env!("CARGO_MANIFEST_DIR")
        ))))),
        ..Config::default()
    };
    let start = Instant::now();
    let mut total = 0u64;
    let mut batch = 0u64;
    loop {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(0x6d69_7272_6f72_0000u64 ^ batch).to_le_bytes());
        if budget.is_some() {
            // Fresh seeds per long run; the seed is printed so a finding can be replayed.
            seed[8..16].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
            seed[16..24].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
        }
        let batch_cases = if budget.is_some() { 256 } else { cases };
        let mut runner = TestRunner::new_with_rng(config(batch_cases), TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        match runner.run(&strategy, &test) {
            Ok(()) => {}
            Err(TestError::Fail(why, value)) => {
                panic!("{name}: {why}\nminimal failing input: {value:#?}\n(batch seed {})", hex(&seed))
            }
            Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
        }
        total += u64::from(batch_cases);
        batch += 1;
        match budget {
            Some(secs) if start.elapsed() < Duration::from_secs(secs) => continue,
            _ => break,
        }
    }
    eprintln!("{name}: {total} cases in {:.1} s ({} batches)", start.elapsed().as_secs_f64(), batch);
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------- spec strategies

fn label(max_inner: usize) -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::string::string_regex(&format!("[a-z0-9]([-a-z0-9]{{0,{max_inner}}}[a-z0-9])?")).unwrap(),
        1 => proptest::string::string_regex("[a-z]{1,3}").unwrap(),
    ]
    .boxed()
}

fn dns_name() -> BoxedStrategy<String> {
    prop_oneof![
        Just("mirror.example.com".to_string()),
        Just("a.b".to_string()),
        prop::collection::vec(label(10), 2..5).prop_map(|parts| parts.join(".")),
        // Long names near the schema's and DNS's limits.
        prop::collection::vec(label(61), 2..5).prop_map(|parts| parts.join(".")),
    ]
    .boxed()
}

/// Registries from the samples, real-world ones, and made-up hosts with a port.
fn registry() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "docker.io",
            "ghcr.io",
            "quay.io",
            "registry.k8s.io",
            "gcr.io",
            "registry.corp.example.com",
            "localhost:5000",
            "10.0.0.1:5000",
            "mcr.microsoft.com",
            "a",
        ])
        .prop_map(String::from),
        (dns_name(), proptest::option::of(0u32..70000)).prop_map(|(h, p)| match p {
            Some(p) => format!("{h}:{p}"),
            None => h,
        }),
    ]
    .boxed()
}

fn remote_url() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "https://registry-1.docker.io",
            "https://ghcr.io",
            "https://quay.io",
            "https://registry.k8s.io",
            "https://gcr.io",
            "http://10.0.0.1:5000",
            "https://registry.corp.example.com/",
            "https://user@host.example:8443/v2/",
            "https://[::1]:5000",
        ])
        .prop_map(String::from),
        (
            prop::sample::select(vec!["http", "https"]),
            dns_name(),
            proptest::option::of(1u32..65536),
            "(/[a-z0-9._-]{0,12}){0,3}"
        )
            .prop_map(|(s, h, p, path)| match p {
                Some(p) => format!("{s}://{h}:{p}{path}"),
                None => format!("{s}://{h}{path}"),
            }),
    ]
    .boxed()
}

fn secret_ref() -> BoxedStrategy<Value> {
    (
        prop::sample::select(vec!["creds", "dockerhub-creds", "corp-registry-creds", "a.b-c"]),
        proptest::option::of(prop::sample::select(vec!["user", "username", "robot.name", "k-1"])),
        proptest::option::of(prop::sample::select(vec!["token", "password", "pw_2"])),
    )
        .prop_map(|(name, u, p)| {
            let mut v = json!({"name": name});
            if let Some(u) = u {
                v["usernameKey"] = json!(u);
            }
            if let Some(p) = p {
                v["passwordKey"] = json!(p);
            }
            v
        })
        .boxed()
}

fn upstream() -> BoxedStrategy<Value> {
    (label(38), registry(), remote_url(), proptest::option::of(secret_ref()), proptest::option::of(dns_name()))
        .prop_map(|(name, registry, url, creds, host)| {
            let mut v = json!({"name": name, "registry": registry, "remoteURL": url});
            if let Some(c) = creds {
                v["credentialsSecretRef"] = c;
            }
            if let Some(h) = host {
                v["host"] = json!(h);
            }
            v
        })
        .boxed()
}

fn quantity() -> BoxedStrategy<Value> {
    prop_oneof![
        prop::sample::select(vec!["20Gi", "1", "100Mi", "0.5", "500m", "1e3", "1Ti"]).prop_map(|q| json!(q)),
        (0u32..100000).prop_map(|n| json!(n)),
        "[0-9]{1,4}(Ki|Mi|Gi|Ti|m|k|M|G)?".prop_map(|q| json!(q)),
    ]
    .boxed()
}

fn resources() -> BoxedStrategy<Value> {
    (proptest::option::of(quantity()), proptest::option::of(quantity()))
        .prop_map(|(cpu, mem)| {
            let mut r = json!({"requests": {}, "limits": {}});
            if let Some(c) = cpu {
                r["requests"]["cpu"] = c;
            }
            if let Some(m) = mem {
                r["limits"]["memory"] = m;
            }
            r
        })
        .boxed()
}

fn string_map() -> BoxedStrategy<Value> {
    prop::collection::btree_map("[a-z]([a-z0-9./-]{0,20}[a-z0-9])?", "[a-zA-Z0-9._-]{0,20}", 0..3)
        .prop_map(|m| json!(m))
        .boxed()
}

fn tolerations() -> BoxedStrategy<Value> {
    prop::collection::vec(
        (
            proptest::option::of("[a-z./-]{1,20}"),
            prop::sample::select(vec!["Exists", "Equal"]),
            proptest::option::of(prop::sample::select(vec!["NoSchedule", "NoExecute", "PreferNoSchedule"])),
        )
            .prop_map(|(k, op, eff)| {
                let mut t = json!({"operator": op});
                if let Some(k) = k {
                    t["key"] = json!(k);
                }
                if let Some(e) = eff {
                    t["effect"] = json!(e);
                }
                t
            }),
        0..3,
    )
    .prop_map(Value::Array)
    .boxed()
}

fn storage() -> BoxedStrategy<Value> {
    prop_oneof![
        proptest::option::of(quantity()).prop_map(|s| match s {
            Some(s) => json!({"emptyDir": {"sizeLimit": s}}),
            None => json!({"emptyDir": {}}),
        }),
        (
            quantity(),
            prop::collection::btree_set(
                prop::sample::select(vec!["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]),
                1..4
            ),
            proptest::option::of("[a-z0-9-]{1,20}"),
        )
            .prop_map(|(size, modes, class)| {
                let mut p = json!({"size": size, "accessModes": modes});
                if let Some(c) = class {
                    p["storageClassName"] = json!(c);
                }
                json!({"persistentVolumeClaim": p})
            }),
        (
            "[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]",
            prop::sample::select(vec!["us-east-1", "eu-west-3", "auto", "x"]),
            proptest::option::of(remote_url()),
            proptest::option::of("(/[a-z0-9_-]{1,10}){0,3}"),
            any::<bool>(),
        )
            .prop_map(|(bucket, region, endpoint, root, creds)| {
                let mut s = json!({"bucket": bucket, "region": region});
                if let Some(e) = endpoint {
                    s["endpoint"] = json!(e);
                }
                if let Some(r) = root {
                    s["rootDirectory"] = json!(r);
                }
                if creds {
                    s["credentialsSecretRef"] = json!({"name": "s3-creds"});
                }
                json!({"s3": s})
            }),
    ]
    .boxed()
}

fn proxy() -> BoxedStrategy<Value> {
    (
        proptest::option::of(prop::sample::select(vec![
            "docker.io/library/registry:3.1.1",
            "docker.io/library/registry:2.8.3",
            "registry@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "localhost:5000/x/y:z",
        ])),
        proptest::option::of(1i64..=20),
        storage(),
        proptest::option::of(prop_oneof![
            Just("168h".to_string()),
            Just("0s".to_string()),
            "([0-9]{1,4}(\\.[0-9]{1,2})?(ns|us|ms|s|m|h)){1,3}",
        ]),
        proptest::option::of(resources()),
        proptest::option::of(string_map()),
        proptest::option::of(tolerations()),
    )
        .prop_map(|(image, replicas, storage, ttl, res, sel, tol)| {
            let mut p = json!({"storage": storage});
            let set = |p: &mut Value, k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    p[k] = v;
                }
            };
            set(&mut p, "image", image.map(|i| json!(i)));
            set(&mut p, "replicas", replicas.map(|r| json!(r)));
            set(&mut p, "ttl", ttl.map(|t| json!(t)));
            set(&mut p, "resources", res);
            set(&mut p, "nodeSelector", sel);
            set(&mut p, "tolerations", tol);
            p
        })
        .boxed()
}

fn edge() -> BoxedStrategy<Value> {
    (
        dns_name(),
        any::<bool>(),
        proptest::option::of(any::<bool>()),
        proptest::option::of(1i64..=20),
        proptest::option::of(prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer"])),
        proptest::option::of(string_map()),
        proptest::option::of(resources()),
    )
        .prop_map(|(domain, tls, redirect, replicas, svc, ann, res)| {
            let mut e = json!({"domain": domain});
            if tls {
                e["tlsSecretRef"] = json!({"name": "mirror-tls"});
            }
            if let Some(r) = redirect {
                e["httpsRedirect"] = json!(r);
            }
            if let Some(r) = replicas {
                e["replicas"] = json!(r);
            }
            if svc.is_some() || ann.is_some() {
                e["service"] = json!({});
                if let Some(t) = svc {
                    e["service"]["type"] = json!(t);
                }
                if let Some(a) = ann {
                    e["service"]["annotations"] = a;
                }
            }
            if let Some(r) = res {
                e["resources"] = r;
            }
            e
        })
        .boxed()
}

fn cron_field() -> BoxedStrategy<String> {
    prop_oneof![
        Just("*".to_string()),
        (0u32..70).prop_map(|n| n.to_string()),
        (0u32..60, 0u32..60).prop_map(|(a, b)| format!("{a}-{b}")),
        (1u32..30).prop_map(|n| format!("*/{n}")),
        (0u32..60, 0u32..60).prop_map(|(a, b)| format!("{a},{b}")),
        prop::sample::select(vec!["MON", "sun", "JAN", "?", "L", "1-5/2"]).prop_map(String::from),
    ]
    .boxed()
}

fn cleanup() -> BoxedStrategy<Value> {
    (
        proptest::option::of(prop_oneof![
            prop::sample::select(vec!["0 3 * * 0", "@weekly", "@daily", "@hourly", "@yearly", "*/5 * * * *"])
                .prop_map(String::from),
            prop::collection::vec(cron_field(), 5).prop_map(|f| f.join(" ")),
        ]),
        proptest::option::of(prop::sample::select(vec!["garbageCollect", "purge"])),
        proptest::option::of(any::<bool>()),
        proptest::option::of(prop::sample::select(vec!["Etc/UTC", "Europe/Paris", "America/New_York", "Bogus/Zone"])),
    )
        .prop_map(|(schedule, policy, suspend, tz)| {
            let mut c = json!({});
            if let Some(s) = schedule {
                c["schedule"] = json!(s);
            }
            if let Some(p) = policy {
                c["policy"] = json!(p);
            }
            if let Some(s) = suspend {
                c["suspend"] = json!(s);
            }
            if let Some(t) = tz {
                c["timeZone"] = json!(t);
            }
            c
        })
        .boxed()
}

fn abs_path() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "/etc/containerd/certs.d",
            "/etc/containerd/config.toml",
            "/etc/containers/registries.conf.d",
            "/etc/docker/daemon.json",
            "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
        ])
        .prop_map(String::from),
        "(/[a-zA-Z0-9._-]{1,12}){1,4}",
    ]
    .boxed()
}

/// CIDRs valid, with host bits, out of range or malformed; namespace names valid or not.
fn network_policy() -> BoxedStrategy<Value> {
    let cidr = prop_oneof![
        (any::<[u8; 4]>(), 0u8..=34).prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
            format!("{}/{p}", std::net::Ipv4Addr::from(u32::from_be_bytes(a) & mask))
        }),
        (any::<u128>(), 0u8..=130).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
        "[0-9a-f:./]{1,20}",
    ];
    let names = prop::collection::vec(prop_oneof![4 => "[a-z][-a-z0-9]{0,10}[a-z0-9]", 1 => "[ -~]{0,12}"], 0..4);
    (
        proptest::option::of(names.clone()),
        proptest::option::of(prop::collection::vec(cidr, 0..4)),
        proptest::option::of(names),
    )
        .prop_map(|(ns, cidrs, metrics)| {
            let mut n = json!({});
            if let Some(v) = ns {
                n["fromNamespaces"] = json!(v);
            }
            if let Some(v) = cidrs {
                n["fromCIDRs"] = json!(v);
            }
            if let Some(v) = metrics {
                n["metricsFromNamespaces"] = json!(v);
            }
            n
        })
        .boxed()
}

fn node_config() -> BoxedStrategy<Value> {
    (
        proptest::option::of((proptest::option::of(abs_path()), proptest::option::of(abs_path()))),
        proptest::option::of(any::<bool>()),
        proptest::option::of(prop::sample::select(vec!["Service", "Edge"])),
        proptest::option::of(proptest::option::of(abs_path())),
        proptest::option::of(proptest::option::of(abs_path())),
        proptest::option::of(string_map()),
        proptest::option::of(tolerations()),
        proptest::option::of(resources()),
    )
        .prop_map(|(containerd, fallback, via, crio, docker, sel, tol, res)| {
            let mut n = json!({});
            if let Some((certs, cfg)) = containerd {
                n["containerd"] = json!({});
                if let Some(c) = certs {
                    n["containerd"]["certsDir"] = json!(c);
                }
                if let Some(c) = cfg {
                    n["containerd"]["configFile"] = json!(c);
                }
            }
            if let Some(f) = fallback {
                n["fallbackToUpstream"] = json!(f);
            }
            if let Some(v) = via {
                n["via"] = json!(v);
            }
            if let Some(c) = crio {
                n["crio"] = c.map(|d| json!({"dropInDir": d})).unwrap_or(json!({}));
            }
            if let Some(d) = docker {
                n["docker"] = d.map(|d| json!({"daemonJson": d})).unwrap_or(json!({}));
            }
            if let Some(s) = sel {
                n["nodeSelector"] = s;
            }
            if let Some(t) = tol {
                n["tolerations"] = t;
            }
            if let Some(r) = res {
                n["resources"] = r;
            }
            n
        })
        .boxed()
}

/// A generated mirror, the users Secret it may name, and the passwords in it.
#[derive(Debug, Clone)]
struct Case {
    mirror: Value,
    users: BTreeMap<String, String>,
}

/// The samples' RegistryMirrors, as the starting points.
fn sample_mirrors() -> Vec<Value> {
    let mut out = Vec::new();
    for name in common::SAMPLES {
        for doc in serde_yaml::Deserializer::from_str(&common::sample_text(name)) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] == "RegistryMirror" {
                out.push(v);
            }
        }
    }
    assert!(out.len() >= common::SAMPLES.len(), "each sample seeds the generator");
    out
}

fn case() -> impl Strategy<Value = Case> {
    let users = prop::collection::btree_map("[a-z][a-z0-9]{0,8}", "[ -~]{8,24}", 1..4);
    (
        prop::sample::select(sample_mirrors()),
        prop_oneof![
            1 => Just(None),
            3 => proptest::string::string_regex("[a-z]([-a-z0-9]{0,14}[a-z0-9])?").unwrap().prop_map(Some),
            // Names near the limits (40 characters; mirror plus upstream at most 56).
            1 => proptest::string::string_regex("[a-z]([-a-z0-9]{30,40}[a-z0-9])?").unwrap().prop_map(Some),
        ],
        // Each section either kept from the sample, dropped, or generated.
        prop_oneof![1 => Just(None), 3 => prop::collection::vec(upstream(), 1..8).prop_map(Some)],
        prop_oneof![1 => Just(None), 2 => proxy().prop_map(Some)],
        prop::sample::select(vec![0u8, 1, 2]),
        prop::sample::select(vec![0u8, 1, 2]),
        prop_oneof![1 => Just(None), 1 => Just(Some(None)), 2 => edge().prop_map(|e| Some(Some(e)))],
        prop_oneof![1 => Just(None), 1 => Just(Some(None)), 2 => cleanup().prop_map(|c| Some(Some(c)))],
        prop_oneof![1 => Just(None), 1 => Just(Some(None)), 2 => node_config().prop_map(|n| Some(Some(n)))],
        prop_oneof![2 => Just(None), 1 => Just(Some(None)), 1 => network_policy().prop_map(|n| Some(Some(n)))],
        users,
    )
        .prop_map(|(mut mirror, name, ups, proxy, auth, node_user, edge, cleanup, node, policy, users)| {
            if let Some(n) = name {
                mirror["metadata"]["name"] = json!(n);
            }
            let spec = &mut mirror["spec"];
            if let Some(ups) = ups {
                spec["upstreams"] = json!(dedupe(ups));
            }
            if let Some(p) = proxy {
                spec["proxy"] = p;
            }
            let first_user = users.keys().next().cloned().unwrap();
            match auth {
                0 => {}
                1 => {
                    spec.as_object_mut().unwrap().remove("clientAuth");
                }
                _ => {
                    spec["clientAuth"] = json!({"usersSecretRef": {"name": "users"}});
                    match node_user {
                        0 => spec["clientAuth"]["nodeUser"] = json!(first_user),
                        1 => spec["clientAuth"]["nodeUser"] = json!("nobody-in-the-secret"),
                        _ => {}
                    }
                }
            }
            let mut section = |key: &str, v: Option<Option<Value>>| match v {
                None => {}
                Some(None) => {
                    spec.as_object_mut().unwrap().remove(key);
                }
                Some(Some(v)) => spec[key] = v,
            };
            section("edge", edge);
            section("cleanup", cleanup);
            section("nodeConfig", node);
            section("networkPolicy", policy);
            Case { mirror, users }
        })
}

/// The schema's list-map key and CEL uniqueness rules make duplicates inadmissible; keep the
/// generator's yield high by making them rare instead of filtering them out.
fn dedupe(ups: Vec<Value>) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    ups.into_iter()
        .filter(|u| {
            seen.insert(u["name"].to_string())
                & seen.insert(u["registry"].to_string())
                & (u["host"].is_null() || seen.insert(u["host"].to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------- checks

fn crd_schema() -> Value {
    let crd = mirrorfleet::api::crd::crd();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

/// The same off-cluster admission as tests/invalid_specs.rs: OpenAPI structure, then CEL.
fn admitted(validator: &jsonschema::Validator, schema: &Value, obj: &Value) -> Result<(), String> {
    let errors: Vec<String> = validator.iter_errors(obj).map(|e| format!("{}: {}", e.instance_path(), e)).collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    kube::core::cel::Validator::new().validate(schema, obj, None).map_err(|e| {
        e.into_vec().into_iter().map(|e| format!("{}: {}", e.field_path, e.message)).collect::<Vec<_>>().join("; ")
    })
}

/// Every byte `render` produces: manifests with Secret data, then every raw file.
fn bytes_of(rendered: &[Rendered]) -> String {
    let mut out = to_yaml_stream(rendered, true);
    for r in rendered {
        for (path, content) in &r.fleet.files {
            out.push_str(&format!("\n### {path}\n{content}"));
        }
    }
    out
}

/// Restricted pods everywhere. The node agent's exceptions: it runs as root (it writes root-owned
/// runtime config on the host) and on the host network (it probes mirrors as the node's runtime
/// will reach them) — still without privilege, escalation, capabilities or a writable root fs,
/// and its writable host paths are only the enabled runtimes' config dirs.
/// A policy exists exactly when the spec asks for one, and none of its rules admits every source
/// or every port (an empty `from` or `ports` means all to the API).
fn check_network_policies(r: &Rendered) -> Result<(), TestCaseError> {
    let policies = &r.fleet.children.network_policies;
    let want = match (&r.mirror.spec.network_policy, &r.mirror.spec.edge) {
        (None, _) => 0,
        (Some(_), None) => 1,
        (Some(_), Some(_)) => 2,
    };
    prop_assert_eq!(policies.len(), want);
    for p in policies {
        for rule in p.spec.as_ref().unwrap().ingress.as_ref().expect("ingress written") {
            prop_assert!(rule.from.as_ref().is_some_and(|f| !f.is_empty()), "{rule:?} admits every source");
            prop_assert!(rule.ports.as_ref().is_some_and(|f| !f.is_empty()), "{rule:?} opens every port");
        }
    }
    Ok(())
}

fn check_pods(r: &Rendered) -> Result<(), TestCaseError> {
    for (id, obj) in common::objects(r) {
        let template = match obj["kind"].as_str().unwrap() {
            "Deployment" | "DaemonSet" => &obj["spec"]["template"]["spec"],
            "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            "Pod" | "Job" | "StatefulSet" | "ReplicaSet" => {
                return Err(TestCaseError::fail(format!("{id}: a pod-owning kind this check does not know")))
            }
            _ => continue,
        };
        let node_agent = obj["kind"] == "DaemonSet";
        let containers: Vec<&Value> = template["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(template["initContainers"].as_array().into_iter().flatten())
            .collect();
        prop_assert!(!containers.is_empty(), "{id}: no containers");
        for c in containers {
            let sc = &c["securityContext"];
            let who = format!("{id} container {}", c["name"]);
            prop_assert_eq!(&sc["allowPrivilegeEscalation"], &json!(false), "{}", who);
            prop_assert_eq!(&sc["readOnlyRootFilesystem"], &json!(true), "{}", who);
            prop_assert_eq!(&sc["privileged"], &json!(false), "{}", who);
            prop_assert_eq!(&sc["capabilities"]["drop"], &json!(["ALL"]), "{}", who);
            prop_assert!(sc["capabilities"]["add"].is_null(), "{}", who);
            if node_agent {
                prop_assert_eq!(&sc["runAsUser"], &json!(0), "{}", who);
            } else {
                let non_root =
                    sc["runAsNonRoot"] == json!(true) || template["securityContext"]["runAsNonRoot"] == json!(true);
                prop_assert!(non_root, "{}: runAsNonRoot", who);
                prop_assert!(
                    sc["runAsUser"] != json!(0) && template["securityContext"]["runAsUser"] != json!(0),
                    "{}",
                    who
                );
            }
        }
        // The node agent's second exception: it probes the mirror from the host's network, which
        // is what containerd on that node will see (src/build/node.rs).
        if !node_agent {
            prop_assert!(template["hostNetwork"].is_null() || template["hostNetwork"] == json!(false), "{}", id);
        }
        prop_assert!(template["hostPID"].is_null() && template["hostIPC"].is_null(), "{}", id);
        let host_paths: Vec<&Value> =
            template["volumes"].as_array().into_iter().flatten().filter(|v| !v["hostPath"].is_null()).collect();
        if node_agent {
            let mounts = template["containers"][0]["volumeMounts"].as_array().unwrap();
            let node = r.mirror.spec.node_config.as_ref().unwrap();
            let mut allowed: BTreeSet<String> = BTreeSet::from([node.containerd.certs_dir.clone()]);
            allowed.extend(node.crio.iter().map(|c| c.drop_in_dir.clone()));
            allowed.extend(
                node.docker
                    .iter()
                    .map(|d| std::path::Path::new(&d.daemon_json).parent().unwrap().display().to_string()),
            );
            for v in host_paths {
                let path = v["hostPath"]["path"].as_str().unwrap();
                let ro = mounts.iter().any(|m| m["name"] == v["name"] && m["readOnly"] == true);
                prop_assert!(
                    ro || allowed.contains(path),
                    "{}: writable host path {} is not a runtime config dir",
                    id,
                    path
                );
                prop_assert!(path != "/" && !path.is_empty(), "{}: host root mounted", id);
            }
        } else {
            prop_assert!(host_paths.is_empty(), "{}: host paths", id);
        }
    }
    Ok(())
}

fn check_no_credentials(r: &Rendered, creds: &[String]) -> Result<(), TestCaseError> {
    for (id, obj) in common::objects(r) {
        if obj["kind"] == "Secret" {
            continue;
        }
        let s = serde_json::to_string(&obj).unwrap();
        for c in creds {
            prop_assert!(!s.contains(c.as_str()), "{} carries a credential", id);
        }
    }
    for (path, content) in &r.fleet.files {
        for c in creds {
            prop_assert!(!content.contains(c.as_str()), "file {} carries a credential", path);
        }
    }
    Ok(())
}

fn users_secret(ns: &str, users: &BTreeMap<String, String>) -> String {
    serde_yaml::to_string(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "users", "namespace": ns},
        "stringData": users,
    }))
    .unwrap()
}

#[test]
fn accepted_specs_render_deterministically_and_safely() {
    let schema = crd_schema();
    let validator = jsonschema::draft4::new(&schema).unwrap();
    let tally = std::sync::Mutex::new(BTreeMap::<String, u64>::new());
    let count = |k: &str| *tally.lock().unwrap().entry(k.to_string()).or_default() += 1;
    run("render_spec", 64, case(), |case| {
        if let Err(why) = admitted(&validator, &schema, &case.mirror) {
            count("refused by the schema");
            if std::env::var_os("PROP_SHOW_REFUSALS").is_some() {
                eprintln!("refused: {}", why.chars().take(300).collect::<String>());
            }
            return Ok(());
        }
        count("admitted");
        let ns = case.mirror["metadata"]["namespace"].as_str().unwrap_or("mirrors").to_string();
        let input = format!("{}---\n{}", users_secret(&ns, &case.users), serde_yaml::to_string(&case.mirror).unwrap());
        let first = render_str(&input, &common::opts());
        let second = render_str(&input, &common::opts());
        match (first, second) {
            (Ok(a), Ok(b)) => {
                count("rendered");
                prop_assert_eq!(bytes_of(&a), bytes_of(&b), "re-rendering differs");
                let b64 = base64::engine::general_purpose::STANDARD;
                let creds: Vec<String> = case
                    .users
                    .iter()
                    .flat_map(|(u, p)| [p.clone(), b64.encode(p), format!("{u}:{p}"), b64.encode(format!("{u}:{p}"))])
                    .filter(|c| c.len() >= 8)
                    .collect();
                for r in &a {
                    check_pods(r)?;
                    check_no_credentials(r, &creds)?;
                    check_network_policies(r)?;
                }
            }
            (Err(a), Err(b)) => {
                let (a, b) = (a.to_string(), b.to_string());
                prop_assert_eq!(&a, &b, "errors differ between two renders");
                // The operator's own checks beyond the schema: each problem names its field.
                for line in a.lines().skip(1) {
                    let p = line.trim_start_matches("  - ");
                    prop_assert!(
                        p.starts_with("spec.") || p.starts_with("metadata."),
                        "problem without a field path: {}",
                        p
                    );
                }
                let first = a.lines().nth(1).unwrap_or("").trim_start_matches("  - ");
                let field = first.split(':').next().unwrap_or("");
                let field: String = field.chars().filter(|c| !c.is_ascii_digit()).collect();
                count(&format!("admitted, refused by the operator at {field}"));
            }
            (a, b) => prop_assert!(false, "one render passed, the other failed: {:?} / {:?}", a.err(), b.err()),
        }
        Ok(())
    });
    let tally = tally.into_inner().unwrap();
    eprintln!("render_spec tally: {tally:#?}");
    // Guards against a generator that the schema refuses wholesale.
    let rendered = tally.get("rendered").copied().unwrap_or(0);
    let total = tally.get("admitted").copied().unwrap_or(0) + tally.get("refused by the schema").copied().unwrap_or(0);
    assert!(rendered * 4 >= total, "too few generated specs render ({rendered} of {total}): {tally:#?}");
}

// ---------------------------------------------------------------- arbitrary YAML

fn corpus() -> Vec<String> {
    let mut out: Vec<String> = common::SAMPLES.iter().map(|s| common::sample_text(s)).collect();
    let dir = common::root().join("tests/fuzz_corpus/render_yaml");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        out.push(std::fs::read_to_string(&f).unwrap());
    }
    assert!(out.len() > 8, "the corpus in {} is there", dir.display());
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Indent(usize, usize),
    Splice(usize, usize),
}

/// YAML-shaped junk: the tokens that change a document's structure or a scalar's type.
fn token() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "*a",
            "&a ",
            "!!binary ",
            "!!str ",
            "!Tag ",
            "~",
            "null",
            "[",
            "]",
            "{",
            "}",
            ": ",
            "- ",
            "\n---\n",
            "\n...\n",
            "\t",
            "? ",
            "|\n",
            ">-\n",
            "'",
            "\"",
            "\\u0000",
            "#",
            "<<: *a\n",
            "0x1F",
            ".inf",
            "-.nan",
            "1e999",
            "99999999999999999999999",
            "-1",
            "true",
            "yes",
            "2001-12-14",
            "=",
            "%YAML 1.2\n",
            "\u{feff}",
            "\r\n",
            "\u{0085}",
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\n",
            "kind: Secret\n",
            "upstreams: ",
        ])
        .prop_map(String::from),
        any::<String>(),
    ]
    .boxed()
}

fn mutated_text() -> impl Strategy<Value = String> {
    let mutation = prop_oneof![
        (any::<usize>(), 0usize..64).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), token()).prop_map(|(a, t)| Mutation::Insert(a, t)),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<usize>(), 0usize..6).prop_map(|(a, n)| Mutation::Indent(a, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Splice(a, b)),
    ];
    prop_oneof![
        1 => any::<String>(),
        1 => prop::collection::vec(token(), 0..40).prop_map(|t| t.concat()),
        8 => (prop::sample::select(corpus()), prop::sample::select(corpus()), prop::collection::vec(mutation, 1..8))
            .prop_map(|(text, other, ms)| ms.iter().fold(text, |t, m| apply(t, m, &other))),
    ]
}

fn char_at(t: &str, i: usize) -> usize {
    if t.is_empty() {
        return 0;
    }
    let mut i = i % (t.len() + 1);
    while !t.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(t: String, m: &Mutation, other: &str) -> String {
    let mut lines: Vec<&str> = t.split('\n').collect();
    let n = lines.len();
    match m {
        Mutation::Delete(a, len) => {
            let a = char_at(&t, *a);
            let b = char_at(&t, a + len).max(a);
            format!("{}{}", &t[..a], &t[b..])
        }
        Mutation::Insert(a, tok) => {
            let a = char_at(&t, *a);
            format!("{}{}{}", &t[..a], tok, &t[a..])
        }
        Mutation::DuplicateLine(a) => {
            let l = lines[a % n];
            lines.insert(a % n, l);
            lines.join("\n")
        }
        Mutation::SwapLines(a, b) => {
            lines.swap(a % n, b % n);
            lines.join("\n")
        }
        Mutation::Indent(a, k) => {
            let s = format!("{}{}", " ".repeat(*k), lines[a % n].trim_start());
            lines[a % n] = &s;
            lines.join("\n")
        }
        Mutation::Splice(a, b) => {
            let a = char_at(&t, *a);
            let b = char_at(other, *b);
            format!("{}{}", &t[..a], &other[b..])
        }
    }
}

#[test]
fn any_yaml_text_renders_or_errors() {
    let tally = std::sync::Mutex::new(BTreeMap::<&'static str, u64>::new());
    let count = |k: &'static str| *tally.lock().unwrap().entry(k).or_default() += 1;
    run("render_yaml", 256, mutated_text(), |text| {
        let first = render_str(&text, &common::opts());
        let second = render_str(&text, &common::opts());
        match (first, second) {
            (Ok(a), Ok(b)) => {
                count("rendered");
                prop_assert_eq!(bytes_of(&a), bytes_of(&b));
            }
            (Err(a), Err(b)) => {
                let (a, b) = (a.to_string(), b.to_string());
                prop_assert_eq!(&a, &b);
                prop_assert!(!a.trim().is_empty(), "an empty error message");
                count(if a.starts_with("document ") {
                    "not YAML"
                } else if a.contains("is invalid:") {
                    "invalid spec"
                } else {
                    "no mirror"
                });
            }
            (a, b) => prop_assert!(false, "one render passed, the other failed: {:?} / {:?}", a.err(), b.err()),
        }
        Ok(())
    });
    let tally = tally.into_inner().unwrap();
    eprintln!("render_yaml tally: {tally:#?}");
    // Guards against mutations that never leave a renderable document (the test would then only
    // exercise the parser).
    assert!(
        tally.get("rendered").copied().unwrap_or(0) > 0 && tally.get("invalid spec").copied().unwrap_or(0) > 0,
        "{tally:?}"
    );
}
