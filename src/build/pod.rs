//! Pod security settings shared by the children's pods.
//!
//! Every pod follows the Kubernetes "restricted" profile except the node agent, which must run as
//! uid 0 to write the runtime's root-owned config directory; it still drops every capability,
//! cannot escalate, and has a read-only root filesystem (see [`node_agent_container_security`]).
//! Every container requests resources: what the spec sets, else a modest default ([`resources`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, EmptyDirVolumeSource, PodSecurityContext, ResourceRequirements,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A non-root uid that exists in neither image's passwd but works for both: the registry and
/// Envoy only need to read their config and write to mounted volumes.
pub const NON_ROOT_UID: i64 = 65532;

pub fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NON_ROOT_UID),
        run_as_group: Some(NON_ROOT_UID),
        fs_group: Some(NON_ROOT_UID),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// The node agent's one exception to "restricted": uid 0, because containerd's config directory
/// is owned by root (owner permissions suffice, so no capability is needed).
pub fn node_agent_container_security() -> SecurityContext {
    SecurityContext { run_as_user: Some(0), run_as_non_root: Some(false), ..restricted_container_security() }
}

pub fn tmp_volume() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource { size_limit: None, medium: None }),
            ..Default::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
    )
}

/// A ConfigMap mounted read-only at `mount_path`, plus the writable `/tmp`: what both the registry
/// and Envoy pods need with a read-only root filesystem.
pub fn config_and_tmp_volumes(config_map: &str, mount_path: &str) -> (Vec<Volume>, Vec<VolumeMount>) {
    let (tmp, tmp_mount) = tmp_volume();
    let config = Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource { name: config_map.to_string(), ..Default::default() }),
        ..Default::default()
    };
    let config_mount = VolumeMount {
        name: "config".into(),
        mount_path: mount_path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    (vec![config, tmp], vec![config_mount, tmp_mount])
}

/// CPU and memory a container requests when the spec sets no `resources` for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requests {
    pub cpu: &'static str,
    pub memory: &'static str,
}

/// The `resources` the spec sets, or else `default` as requests without limits: the scheduler
/// then counts the container, and it is not the first to go when its node runs short (a pod
/// without requests is BestEffort). No default limit: a cache or proxy cut at an arbitrary
/// ceiling fails pulls; the spec can set one.
pub fn resources(set: Option<&ResourceRequirements>, default: Requests) -> ResourceRequirements {
    set.cloned().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(default.cpu.into())),
            ("memory".to_string(), Quantity(default.memory.into())),
        ])),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use crate::build::Fleet;
    use crate::render::{render_str, RenderOptions};

    const SAMPLES: [&str; 3] = [
        include_str!("../../config/samples/minimal.yaml"),
        include_str!("../../config/samples/private-upstream.yaml"),
        include_str!("../../config/samples/public-mirrors.yaml"),
    ];

    /// Every kind of container the builders make, with no `resources` set anywhere.
    const EVERY_CONTAINER: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: users}
stringData: {ci: ci-password, nodes: nodes-password}
---
apiVersion: mirrorfleet.io/v1alpha1
kind: RegistryMirror
metadata: {name: all}
spec:
  upstreams:
  - {name: dockerhub, registry: docker.io, remoteURL: "https://registry-1.docker.io"}
  proxy: {storage: {emptyDir: {}}}
  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}
  edge: {domain: mirror.example.com}
  cleanup: {schedule: "0 3 * * 0"}
  nodeConfig: {}
"#;

    fn render(yaml: &str) -> Vec<Fleet> {
        render_str(yaml, &RenderOptions::default()).unwrap().into_iter().map(|r| r.fleet).collect()
    }

    /// (object, container name, its resources) for every container and init container of every
    /// pod template in the fleet.
    fn containers(fleet: &Fleet) -> Vec<(String, String, Value)> {
        fn walk(at: &str, v: &Value, out: &mut Vec<(String, String, Value)>) {
            match v {
                Value::Object(m) => {
                    for (k, child) in m {
                        if k == "containers" || k == "initContainers" {
                            for c in child.as_array().into_iter().flatten() {
                                let name = c["name"].as_str().unwrap_or_default().to_string();
                                out.push((at.to_string(), name, c["resources"].clone()));
                            }
                        } else {
                            walk(at, child, out);
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|i| walk(at, i, out)),
                _ => {}
            }
        }
        let c = &fleet.children;
        let objects: Vec<Value> = [
            c.deployments.iter().map(|o| serde_json::to_value(o).unwrap()).collect::<Vec<_>>(),
            c.daemon_sets.iter().map(|o| serde_json::to_value(o).unwrap()).collect(),
            c.cron_jobs.iter().map(|o| serde_json::to_value(o).unwrap()).collect(),
        ]
        .concat();
        let mut out = Vec::new();
        for obj in &objects {
            let id = format!("{}/{}", obj["kind"].as_str().unwrap_or("?"), obj["metadata"]["name"].as_str().unwrap());
            walk(&id, obj, &mut out);
        }
        out
    }

    fn has_requests(resources: &Value) -> bool {
        let requests = &resources["requests"];
        // Limits alone count too: the API server makes them the requests.
        let set = |k: &str| requests[k].is_string() || resources["limits"][k].is_string();
        set("cpu") && set("memory")
    }

    #[test]
    fn every_container_of_every_rendered_object_requests_cpu_and_memory() {
        let mut seen = BTreeSet::new();
        for yaml in SAMPLES.iter().chain([&EVERY_CONTAINER]) {
            for fleet in render(yaml) {
                for (object, container, resources) in containers(&fleet) {
                    assert!(has_requests(&resources), "{object}: container {container} requests {resources}");
                    seen.insert(container);
                }
            }
        }
        let every: BTreeSet<String> =
            ["registry", "cache-keeper", "cache-cleanup", "upstream-envoy", "envoy", "cleanup", "node-agent"]
                .map(String::from)
                .into();
        assert_eq!(seen, every, "a container kind the test does not know, or one it never saw");
    }

    #[test]
    fn defaults_apply_only_where_the_spec_sets_no_resources() {
        let fleet = render(EVERY_CONTAINER).remove(0);
        let requests = |r: &Value| (r["requests"]["cpu"].clone(), r["requests"]["memory"].clone(), r["limits"].clone());
        let by_name = |fleet: &Fleet, name: &str| {
            containers(fleet).into_iter().find(|c| c.1 == name).unwrap_or_else(|| panic!("no {name}")).2
        };
        for (name, cpu, memory) in [
            ("registry", "100m", "128Mi"),
            ("cache-cleanup", "100m", "128Mi"),
            ("upstream-envoy", "20m", "32Mi"),
            ("envoy", "50m", "64Mi"),
            ("cleanup", "50m", "64Mi"),
        ] {
            assert_eq!(requests(&by_name(&fleet, name)), (cpu.into(), memory.into(), Value::Null), "{name}");
        }

        let set = EVERY_CONTAINER
            .replace("proxy: {storage: {emptyDir: {}}}", "proxy: {storage: {emptyDir: {}}, resources: {requests: {cpu: 1, memory: 1Gi}}}")
            .replace("edge: {domain: mirror.example.com}", "edge: {domain: mirror.example.com, resources: {requests: {cpu: 200m, memory: 100Mi}, limits: {memory: 200Mi}}}")
            .replace(r#"cleanup: {schedule: "0 3 * * 0"}"#, r#"cleanup: {schedule: "0 3 * * 0", resources: {requests: {cpu: 10m, memory: 32Mi}}}"#);
        let fleet = render(&set).remove(0);
        assert_eq!(requests(&by_name(&fleet, "registry")), ("1".into(), "1Gi".into(), Value::Null));
        assert_eq!(requests(&by_name(&fleet, "cache-cleanup")), ("1".into(), "1Gi".into(), Value::Null));
        let envoy = requests(&by_name(&fleet, "envoy"));
        assert_eq!(envoy, ("200m".into(), "100Mi".into(), serde_json::json!({"memory": "200Mi"})));
        assert_eq!(requests(&by_name(&fleet, "cleanup")), ("10m".into(), "32Mi".into(), Value::Null));
    }
}
