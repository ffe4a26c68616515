//! Pod security settings shared by the children's pods.
//!
//! Every pod follows the Kubernetes "restricted" profile except the node agent, which must run as
//! uid 0 to write the runtime's root-owned config directory; it still drops every capability,
//! cannot escalate, and has a read-only root filesystem (see [`node_agent_container_security`]).

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, EmptyDirVolumeSource, PodSecurityContext, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};

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
