//! The committed CRD is exactly what `mirrorfleet crd` prints (`make generate` rewrites it).

use std::path::Path;

#[test]
fn committed_crd_matches_generated() {
    let generated = mirrorfleet::api::crd::crd_yaml();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut copies = vec![
        root.join("crds/registrymirrors.mirrorfleet.io.yaml"),
        root.join("config/crd/registrymirrors.mirrorfleet.io.yaml"),
    ];
    let chart_copy = root.join("charts/mirrorfleet/crds/registrymirrors.mirrorfleet.io.yaml");
    if chart_copy.exists() || root.join("charts/mirrorfleet/Chart.yaml").exists() {
        copies.push(chart_copy);
    }
    for path in copies {
        let committed =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run `make generate`", path.display()));
        assert!(committed == generated, "{} differs from `mirrorfleet crd`; run `make generate`", path.display());
    }
}

#[test]
fn crd_has_the_promised_shape() {
    let crd = mirrorfleet::api::crd::crd();
    assert_eq!(crd.spec.group, "mirrorfleet.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["regmirror".to_string()][..]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    let columns: Vec<&str> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    for want in ["Ready", "Upstreams", "Nodes", "Age"] {
        assert!(columns.contains(&want), "printer column {want} missing: {columns:?}");
    }
    let schema = serde_json::to_value(v.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
    let upstreams = &schema["properties"]["spec"]["properties"]["upstreams"];
    assert_eq!(upstreams["x-kubernetes-list-type"], "map", "upstream names unique by list-map key");
    assert_eq!(upstreams["x-kubernetes-list-map-keys"][0], "name");
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type", "conditions keyed by type");
}
