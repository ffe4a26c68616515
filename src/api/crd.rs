//! The CustomResourceDefinition as shipped in `crds/` and the Helm chart.
//!
//! The derive produces the schema; this adds the rules that need `metadata.name`, which only a
//! root-level CEL rule can see.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::json;

use super::{RegistryMirror, MAX_MIRROR_NAME, MAX_MIRROR_PLUS_UPSTREAM};

/// The full CRD, with root-level name rules.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = RegistryMirror::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else {
            continue;
        };
        let rules = vec![
            json!({
                "rule": format!("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= {MAX_MIRROR_NAME}"),
                "message": format!("metadata.name must start with a letter, be a DNS-1035 label and at most {MAX_MIRROR_NAME} characters (child objects are named after it)"),
            }),
            json!({
                "rule": format!("!has(self.spec) || self.spec.upstreams.all(u, size(self.metadata.name) + size(u.name) <= {MAX_MIRROR_PLUS_UPSTREAM})"),
                "message": format!("metadata.name plus an upstream name must be at most {MAX_MIRROR_PLUS_UPSTREAM} characters (the proxy objects are named <mirror>-proxy-<upstream>)"),
            }),
        ];
        schema.x_kubernetes_validations = Some(
            rules
                .into_iter()
                .map(|r| serde_json::from_value(r).expect("static CEL rule is a valid ValidationRule"))
                .collect(),
        );
        // The spec is required: a RegistryMirror without upstreams means nothing.
        let mut required = schema.required.take().unwrap_or_default();
        if !required.iter().any(|r| r == "spec") {
            required.push("spec".into());
        }
        schema.required = Some(required);
    }
    crd
}

/// The CRD as YAML, exactly what `mirrorfleet crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd()).expect("CRD serializes to YAML")
}
