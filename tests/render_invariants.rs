//! Properties every rendered fleet must have: standard labels and a controller owner reference on
//! every object, no credential outside a Secret, byte-identical re-renders, restricted pods, and
//! config changes that roll exactly the pods reading that config.

mod common;

use std::collections::BTreeMap;

use base64::Engine;
use mirrorfleet::render::{render_str, secret_strings};
use serde_json::Value;

#[test]
fn every_object_has_standard_labels_and_a_controller_owner_reference() {
    for name in common::SAMPLES {
        for r in common::render_sample(name) {
            let mirror = r.mirror.metadata.name.clone().unwrap();
            let objects = common::objects(&r);
            assert!(!objects.is_empty());
            for (id, obj) in objects {
                let labels = &obj["metadata"]["labels"];
                assert_eq!(labels["app.kubernetes.io/name"], "mirrorfleet", "{name}: {id}");
                assert_eq!(labels["app.kubernetes.io/instance"], mirror.as_str(), "{name}: {id}");
                assert_eq!(labels["app.kubernetes.io/managed-by"], "mirrorfleet-operator", "{name}: {id}");
                let component = labels["app.kubernetes.io/component"].as_str().unwrap_or("");
                assert!(
                    ["proxy", "edge", "auth", "cleanup", "node-agent"].contains(&component),
                    "{name}: {id}: component {component:?}"
                );
                assert_eq!(obj["metadata"]["namespace"], "mirrors", "{name}: {id}");
                let owners = obj["metadata"]["ownerReferences"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{id} has no ownerReferences"));
                assert_eq!(owners.len(), 1, "{id}");
                assert_eq!(owners[0]["kind"], "RegistryMirror");
                assert_eq!(owners[0]["apiVersion"], "mirrorfleet.io/v1alpha1");
                assert_eq!(owners[0]["name"], mirror.as_str());
                assert_eq!(owners[0]["controller"], true, "{id}");
                assert_eq!(owners[0]["blockOwnerDeletion"], true, "{id}");
            }
        }
    }
}

/// All the forms a credential could leak in.
fn leak_forms(secret_value: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![secret_value.to_string(), b64.encode(secret_value)]
}

#[test]
fn credentials_appear_in_no_object_but_secrets() {
    for name in common::SAMPLES {
        let text = common::sample_text(name);
        // Every value of every Secret in the sample input is a credential.
        let mut creds: Vec<String> = Vec::new();
        let mut users = BTreeMap::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"].as_str() == Some("Secret") {
                let s: k8s_openapi::api::core::v1::Secret = serde_yaml::from_value(v).unwrap();
                for (k, val) in secret_strings(&s) {
                    creds.extend(leak_forms(&val));
                    users.insert(k, val);
                }
            }
        }
        for (user, password) in &users {
            creds.extend(leak_forms(&format!("{user}:{password}")));
        }
        let rendered = render_str(&text, &common::opts()).unwrap();
        for r in &rendered {
            for (id, obj) in common::objects(r) {
                if obj["kind"] == "Secret" {
                    continue;
                }
                let serialized = serde_json::to_string(&obj).unwrap();
                for c in &creds {
                    assert!(!serialized.contains(c.as_str()), "{name}: {id} contains a credential");
                }
            }
            for (path, content) in &r.fleet.files {
                for c in &creds {
                    assert!(!content.contains(c.as_str()), "{name}: file {path} contains a credential");
                }
            }
        }
        // Render output (secrets redacted by default) carries none either.
        let stdout = mirrorfleet::render::to_yaml_stream(&rendered, false);
        for c in &creds {
            assert!(!stdout.contains(c.as_str()), "{name}: render output contains a credential");
        }
    }
}

#[test]
fn public_sample_really_carries_credentials_to_test_for() {
    // Guards the test above against passing vacuously.
    let r = &common::render_sample("public-mirrors")[0];
    let secrets = &r.fleet.children.secrets;
    assert_eq!(secrets.len(), 2, "htpasswd and node-auth Secrets");
    let htpasswd = String::from_utf8(secrets[0].data.as_ref().unwrap()["htpasswd"].0.clone()).unwrap();
    assert!(htpasswd.starts_with("ci:$2y$05$"), "{htpasswd}");
    assert_eq!(htpasswd.lines().count(), 2);
    for line in htpasswd.lines() {
        let (user, hash) = line.split_once(':').unwrap();
        let password = if user == "ci" { "change-me-ci-password" } else { "change-me-nodes-password" };
        assert!(bcrypt::verify(password, hash).unwrap(), "{user}'s hash verifies");
    }
}

#[test]
fn rerendering_is_byte_identical() {
    for name in common::SAMPLES {
        let a = mirrorfleet::render::to_yaml_stream(&common::render_sample(name), true);
        let b = mirrorfleet::render::to_yaml_stream(&common::render_sample(name), true);
        assert!(a == b, "{name}: two renders differ");
    }
}

fn pod_annotations(r: &mirrorfleet::render::Rendered) -> BTreeMap<String, Value> {
    r.fleet
        .children
        .deployments
        .iter()
        .map(|d| {
            let v = serde_json::to_value(d).unwrap();
            (d.metadata.name.clone().unwrap(), v["spec"]["template"]["metadata"]["annotations"].clone())
        })
        .collect()
}

fn changed(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> Vec<String> {
    a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect()
}

#[test]
fn a_config_change_rolls_exactly_the_pods_that_read_it() {
    let base_text = common::sample_text("public-mirrors");
    let base = pod_annotations(&render_str(&base_text, &common::opts()).unwrap()[0]);

    // One upstream's remote: only that proxy rolls.
    let t = base_text.replace("remoteURL: https://quay.io", "remoteURL: https://quay.example.com");
    let roll = changed(&base, &pod_annotations(&render_str(&t, &common::opts()).unwrap()[0]));
    assert_eq!(roll, vec!["public-proxy-quay".to_string()]);

    // A password: every proxy reads the htpasswd file, the edge does not.
    let t = base_text.replace("ci: change-me-ci-password", "ci: rotated-password");
    let mut roll = changed(&base, &pod_annotations(&render_str(&t, &common::opts()).unwrap()[0]));
    roll.sort();
    let mut proxies: Vec<String> =
        ["dockerhub", "gcr", "ghcr", "k8s", "quay"].iter().map(|u| format!("public-proxy-{u}")).collect();
    proxies.sort();
    assert_eq!(roll, proxies);

    // An edge host: Envoy reloads listeners from its watched directory, nothing rolls.
    let t = base_text.replace("host: docker.mirror.example.com", "host: hub.mirror.example.com");
    let rendered = render_str(&t, &common::opts()).unwrap();
    assert!(changed(&base, &pod_annotations(&rendered[0])).is_empty());
    let lds = &rendered[0].fleet.files["edge/lds.yaml"];
    assert!(lds.contains("hub.mirror.example.com"));
}

#[test]
fn pods_run_restricted_and_the_node_agent_exception_is_narrow() {
    for name in common::SAMPLES {
        for r in common::render_sample(name) {
            for (id, obj) in common::objects(&r) {
                let template = match obj["kind"].as_str().unwrap() {
                    "Deployment" | "DaemonSet" => &obj["spec"]["template"]["spec"],
                    "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                    _ => continue,
                };
                let node_agent = obj["kind"] == "DaemonSet";
                for c in template["containers"].as_array().unwrap() {
                    let sc = &c["securityContext"];
                    assert_eq!(sc["allowPrivilegeEscalation"], false, "{id}");
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{id}");
                    assert_eq!(sc["privileged"], false, "{id}");
                    assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{id}");
                    assert!(sc["capabilities"]["add"].is_null(), "{id}");
                    if node_agent {
                        assert_eq!(sc["runAsUser"], 0, "{id}: writes root-owned runtime config");
                    } else {
                        assert_eq!(sc["runAsNonRoot"], true, "{id}");
                        assert_eq!(template["securityContext"]["runAsNonRoot"], true, "{id}");
                    }
                }
                let host_paths: Vec<&Value> =
                    template["volumes"].as_array().into_iter().flatten().filter(|v| !v["hostPath"].is_null()).collect();
                if node_agent {
                    // Writable: only the config dirs of the runtimes the spec enables. Read-only:
                    // containerd's config dir, where the agent checks that containerd reads certs.d.
                    let mounts = template["containers"][0]["volumeMounts"].as_array().unwrap();
                    let read_only =
                        |v: &&&Value| mounts.iter().any(|m| m["name"] == v["name"] && m["readOnly"] == true);
                    let (ro, rw): (Vec<&Value>, Vec<&Value>) = host_paths.iter().partition(read_only);
                    let node = r.mirror.spec.node_config.as_ref().unwrap();
                    let mut want_rw = vec![node.containerd.certs_dir.clone()];
                    want_rw.extend(node.crio.iter().map(|c| c.drop_in_dir.clone()));
                    want_rw.extend(
                        node.docker
                            .iter()
                            .map(|d| std::path::Path::new(&d.daemon_json).parent().unwrap().display().to_string()),
                    );
                    let rw: Vec<String> =
                        rw.iter().map(|v| v["hostPath"]["path"].as_str().unwrap().to_string()).collect();
                    assert_eq!(rw, want_rw, "{id}: writable host paths are the enabled runtimes' config dirs");
                    let ro: Vec<&str> = ro.iter().map(|v| v["hostPath"]["path"].as_str().unwrap()).collect();
                    assert_eq!(ro, ["/etc/containerd"], "{id}: read-only host paths");
                } else {
                    assert!(host_paths.is_empty(), "{id}: no host paths");
                    assert!(template["hostNetwork"].is_null(), "{id}");
                }
            }
        }
    }
}

#[test]
fn a_rotated_secret_rolls_exactly_the_pods_that_read_it() {
    use mirrorfleet::build::{build, Inputs, Settings};
    let r = &common::render_sample("private-upstream")[0];
    let mut public = common::render_sample("public-mirrors")[0].mirror.clone();
    public.metadata.uid = Some("uid".into());
    let users = BTreeMap::from([("ci".to_string(), "a".to_string()), ("nodes".to_string(), "b".to_string())]);
    let annotations = |mirror: &mirrorfleet::api::RegistryMirror, versions: &[(&str, &str)]| {
        let inputs = Inputs {
            client_users: Some(users.clone()),
            secret_versions: versions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Inputs::default()
        };
        let fleet = build(mirror, &inputs, &Settings::default()).unwrap();
        pod_annotations(&mirrorfleet::render::Rendered { mirror: mirror.clone(), fleet })
    };

    // The upstream credentials Secret: only the proxy that reads it.
    let before = annotations(&r.mirror, &[("corp-registry-creds", "10"), ("ngc-creds", "7")]);
    let after = annotations(&r.mirror, &[("corp-registry-creds", "11"), ("ngc-creds", "7")]);
    assert_eq!(changed(&before, &after), vec!["corp-proxy-corp".to_string()]);

    // The edge certificate: only Envoy.
    let before = annotations(&public, &[("mirror-tls", "1")]);
    let after = annotations(&public, &[("mirror-tls", "2")]);
    assert_eq!(changed(&before, &after), vec!["public-edge".to_string()]);
    let text = serde_json::to_string(&after).unwrap();
    assert!(text.contains("mirror-tls=2"), "a version, not the content: {text}");
}

fn children_as_json(c: &mirrorfleet::build::DesiredChildren) -> Vec<Value> {
    fn all<T: serde::Serialize>(out: &mut Vec<Value>, items: &[T]) {
        out.extend(items.iter().map(|i| serde_json::to_value(i).unwrap()));
    }
    let mut out = Vec::new();
    all(&mut out, &c.service_accounts);
    all(&mut out, &c.roles);
    all(&mut out, &c.role_bindings);
    all(&mut out, &c.secrets);
    all(&mut out, &c.config_maps);
    all(&mut out, &c.persistent_volume_claims);
    all(&mut out, &c.network_policies);
    all(&mut out, &c.services);
    all(&mut out, &c.deployments);
    all(&mut out, &c.daemon_sets);
    all(&mut out, &c.cron_jobs);
    out
}

/// `render` writes YAML with serde-saphyr and everything downstream reads it with another parser
/// (kubectl and the API server: Go's yaml; Envoy: yaml-cpp; Distribution: Go's yaml.v2). Every
/// rendered document reads back as the object it was made from, and strings a YAML 1.1 reader
/// would take for a bool, number, null or timestamp are quoted.
#[test]
fn rendered_yaml_reads_back_as_the_objects_it_was_made_from() {
    for name in common::SAMPLES {
        let rendered = common::render_sample(name);
        let stream = mirrorfleet::render::to_yaml_stream(&rendered, true);
        let read_back: Vec<Value> = serde_yaml::Deserializer::from_str(&stream)
            .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML parses"))
            .collect();
        // The typed children, straight to JSON, in the order render writes them.
        let objects: Vec<Value> = rendered.iter().flat_map(|r| children_as_json(&r.fleet.children)).collect();
        assert_eq!(read_back.len(), objects.len(), "{name}");
        for (got, want) in read_back.iter().zip(&objects) {
            assert!(got == want, "{name}: {} {} does not read back", want["kind"], want["metadata"]["name"]);
        }
    }

    let tricky = [
        "yes",
        "No",
        "on",
        "OFF",
        "y",
        "n",
        "true",
        "null",
        "~",
        "",
        "0x1F",
        "0o17",
        "1e3",
        "1_000",
        "12:30:00",
        "2001-12-14",
        ".5",
        "-",
        "- x",
        ": x",
        "a: b",
        "#x",
        "x #y",
        "@at",
        "*ref",
        "&anchor",
        "!tag",
        "%d",
        "'q'",
        "\"dq\"",
        " lead",
        "trail ",
        "multi\nline\n",
        "no newline at end\nx",
        "tab\there",
        "uni ✓ code",
        "back\\slash",
        "---",
        "...",
        "<<",
        "=",
    ];
    let data: BTreeMap<String, String> =
        tricky.iter().enumerate().map(|(i, s)| (format!("k{i}"), s.to_string())).collect();
    let cm = k8s_openapi::api::core::v1::ConfigMap { data: Some(data.clone()), ..Default::default() };
    let text = mirrorfleet::build::to_yaml(&cm);
    let back: k8s_openapi::api::core::v1::ConfigMap = serde_yaml::from_str(&text).unwrap();
    assert_eq!(back.data.as_ref(), Some(&data), "{text}");
    for word in ["yes", "No", "on", "OFF", "y", "n", "true", "null", "~", "0x1F", "12:30:00", "2001-12-14", "="] {
        let i = tricky.iter().position(|t| *t == word).unwrap();
        let line = text.lines().find(|l| l.trim_start().starts_with(&format!("k{i}:"))).unwrap();
        let value = line.split_once(": ").unwrap().1;
        assert!(value.starts_with('"') || value.starts_with('\''), "{word:?} is not quoted: {line}");
    }
}

/// `zoneLocal` (on unless set false): every serving Deployment spreads its own pods over zones as
/// a preference, per rollout, and every serving Service prefers same-zone endpoints; off, neither.
#[test]
fn zone_local_spreads_serving_pods_over_zones_and_keeps_traffic_in_the_zone() {
    let text = common::sample_text("public-mirrors");
    for zone_local in [None, Some(true), Some(false)] {
        let text = match zone_local {
            None => text.clone(),
            Some(on) => text.replacen("spec:\n", &format!("spec:\n  zoneLocal: {on}\n"), 1),
        };
        let rendered = render_str(&text, &common::opts()).unwrap();
        let on = zone_local.unwrap_or(true);
        assert_eq!(rendered[0].mirror.spec.zone_local, on);
        let objects = common::objects(&rendered[0]);
        let (mut deployments, mut services) = (0, 0);
        for (id, obj) in &objects {
            match obj["kind"].as_str().unwrap() {
                "Deployment" => {
                    deployments += 1;
                    let pod = &obj["spec"]["template"];
                    let spread = &pod["spec"]["topologySpreadConstraints"];
                    if !on {
                        assert!(spread.is_null(), "{id}: {spread}");
                        continue;
                    }
                    let spread = spread.as_array().unwrap_or_else(|| panic!("{id} does not spread"));
                    assert_eq!(spread.len(), 1, "{id}");
                    assert_eq!(spread[0]["topologyKey"], "topology.kubernetes.io/zone", "{id}");
                    assert_eq!(spread[0]["whenUnsatisfiable"], "ScheduleAnyway", "{id}: a preference only");
                    assert_eq!(spread[0]["maxSkew"], 1, "{id}");
                    assert_eq!(spread[0]["matchLabelKeys"], serde_json::json!(["pod-template-hash"]), "{id}");
                    // It counts this Deployment's pods: its own selector, which its template matches.
                    assert_eq!(
                        spread[0]["labelSelector"]["matchLabels"], obj["spec"]["selector"]["matchLabels"],
                        "{id}"
                    );
                    for (k, v) in obj["spec"]["selector"]["matchLabels"].as_object().unwrap() {
                        assert_eq!(&pod["metadata"]["labels"][k], v, "{id}");
                    }
                }
                "Service" => {
                    services += 1;
                    let want = if on { serde_json::json!("PreferClose") } else { Value::Null };
                    assert_eq!(obj["spec"]["trafficDistribution"], want, "{id}");
                }
                _ => {}
            }
        }
        // Every proxy and the edge.
        let upstreams = rendered[0].mirror.spec.upstreams.len();
        assert_eq!((deployments, services), (upstreams + 1, upstreams + 1));
    }
}

/// A regional mirror pins its proxies and its edge with their node selectors.
#[test]
fn the_edge_and_the_proxies_take_a_node_selector() {
    let text = common::sample_text("public-mirrors")
        .replace("  edge:\n", "  edge:\n    nodeSelector: {topology.kubernetes.io/region: eu-west-1}\n");
    let text =
        text.replacen("  proxy:\n", "  proxy:\n    nodeSelector: {topology.kubernetes.io/region: eu-west-1}\n", 1);
    let rendered = render_str(&text, &common::opts()).unwrap();
    for (id, obj) in common::objects(&rendered[0]) {
        if obj["kind"] == "Deployment" {
            let selector = &obj["spec"]["template"]["spec"]["nodeSelector"];
            assert_eq!(selector["topology.kubernetes.io/region"], "eu-west-1", "{id}");
        }
    }
}

/// Two mirrors of one input that would configure docker.io on the same nodes: render refuses the
/// one the operator would refuse, with the field to change; a mirror per region renders.
#[test]
fn render_refuses_the_second_mirror_configuring_a_registry_on_the_same_nodes() {
    let second = |selector: &str| {
        format!(
            "---\napiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: team, namespace: mirrors}}\n\
             spec:\n  upstreams:\n  - {{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}\n\
             \x20 nodeConfig: {{nodeSelector: {selector}}}\n"
        )
    };
    let public = common::sample_text("public-mirrors");
    let err = render_str(&format!("{public}{}", second("{}")), &common::opts()).err().expect("refused").to_string();
    assert!(err.contains("RegistryMirror mirrors/team (document"), "{err}");
    assert!(
        err.contains("spec.nodeConfig.nodeSelector: RegistryMirror mirrors/public already configures docker.io"),
        "{err}"
    );
    assert!(!err.contains("RegistryMirror mirrors/public (document"), "the first one is fine: {err}");
    // Exclusive selectors: both render.
    let regional =
        public.replacen("  nodeConfig:\n", "  nodeConfig:\n    nodeSelector: {topology.kubernetes.io/region: eu}\n", 1);
    assert_ne!(regional, public, "the sample has a nodeConfig block");
    let both = render_str(&format!("{regional}{}", second("{topology.kubernetes.io/region: us}")), &common::opts())
        .expect("one mirror per region");
    assert_eq!(both.len(), 2);
}

/// `kubectl apply -k config/samples` applies every sample its kustomization lists at once: they
/// must render together, with no two mirrors configuring one registry on the same nodes.
#[test]
fn the_samples_the_kustomization_lists_render_together() {
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(common::root().join("config/samples/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let files: Vec<&str> =
        kustomization["resources"].as_sequence().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(files.len() >= 4, "{files:?}");
    let all: String = files
        .iter()
        .map(|f| format!("---\n{}", std::fs::read_to_string(common::root().join("config/samples").join(f)).unwrap()))
        .collect();
    let rendered = render_str(&all, &common::opts()).unwrap_or_else(|e| panic!("the listed samples together: {e}"));
    assert!(rendered.len() >= files.len());
    // regional.yaml stays out of it for that reason: with public-mirrors.yaml it is refused.
    let regional = format!("{all}---\n{}", common::sample_text("regional"));
    let err = render_str(&regional, &common::opts()).err().expect("regional conflicts with public").to_string();
    assert!(err.contains("NodeConfigConflict") || err.contains("already configures docker.io"), "{err}");
}
