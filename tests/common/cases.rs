//! The table of invalid RegistryMirrors, shared by the off-cluster schema test
//! (tests/invalid_specs.rs) and the real-API-server admission test (tests/cluster_admission.rs).

use serde_json::Value;

pub const USERS: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: users, namespace: mirrors}
stringData: {ci: ci-password, nodes: nodes-password}
"#;

pub const BASE: &str = r#"
apiVersion: mirrorfleet.io/v1alpha1
kind: RegistryMirror
metadata: {name: fleet, namespace: mirrors}
spec:
  upstreams:
  - {name: dockerhub, registry: docker.io, remoteURL: "https://registry-1.docker.io"}
  - {name: ghcr, registry: ghcr.io, remoteURL: "https://ghcr.io"}
  proxy:
    replicas: 2
    storage: {emptyDir: {sizeLimit: 10Gi}}
  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}
  edge: {domain: mirror.example.com, tlsSecretRef: {name: tls}}
  cleanup: {schedule: "0 3 * * 0"}
  nodeConfig: {fallbackToUpstream: true}
"#;

/// Who catches a mistake at admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// The OpenAPI part or a CEL rule of the CRD schema.
    Schema,
    /// The API server's list-map key uniqueness (`x-kubernetes-list-map-keys`), not evaluable here;
    /// the test checks the schema declares it.
    ListMapKey,
    /// A field the schema does not declare: the API server refuses it under server-side apply and
    /// strict field validation (kubectl's default); off-cluster the test checks the schema does not
    /// preserve unknown fields there.
    UnknownField,
    /// Nothing at admission: the operator reports it (Ready=False) and render refuses.
    Operator,
}

pub struct Case {
    pub what: &'static str,
    pub edit: fn(&mut Value),
    pub path: &'static str,
    pub message: &'static str,
    pub admission: Admission,
}

fn up(v: &mut Value, i: usize) -> &mut Value {
    &mut v["spec"]["upstreams"][i]
}

pub fn cases() -> Vec<Case> {
    use Admission::*;
    vec![
        Case {
            what: "upstream name not a DNS label",
            edit: |v| up(v, 0)["name"] = "Docker_Hub".into(),
            path: "spec.upstreams[0].name",
            message: "DNS-1123 label",
            admission: Schema,
        },
        Case {
            what: "duplicate upstream name",
            edit: |v| up(v, 1)["name"] = "dockerhub".into(),
            path: "spec.upstreams[1].name",
            message: "duplicate upstream name",
            admission: ListMapKey,
        },
        Case {
            what: "duplicate registry",
            edit: |v| up(v, 1)["registry"] = "docker.io".into(),
            path: "spec.upstreams[1].registry",
            message: "already used",
            admission: Schema,
        },
        Case {
            what: "registry with a path",
            edit: |v| up(v, 0)["registry"] = "docker.io/library".into(),
            path: "spec.upstreams[0].registry",
            message: "not a registry host name",
            admission: Schema,
        },
        Case {
            what: "remoteURL with a non-http scheme",
            edit: |v| up(v, 0)["remoteURL"] = "ftp://registry-1.docker.io".into(),
            path: "spec.upstreams[0].remoteURL",
            message: "scheme",
            admission: Schema,
        },
        Case {
            what: "remoteURL without a scheme",
            edit: |v| up(v, 0)["remoteURL"] = "registry-1.docker.io/v2".into(),
            path: "spec.upstreams[0].remoteURL",
            message: "not an absolute URL",
            admission: Schema,
        },
        Case {
            what: "remoteURL with a query",
            edit: |v| up(v, 0)["remoteURL"] = "https://registry-1.docker.io/?x=1".into(),
            path: "spec.upstreams[0].remoteURL",
            message: "query",
            admission: Schema,
        },
        Case {
            what: "auth Bearer without a realm",
            edit: |v| up(v, 0)["auth"] = serde_json::json!({"service": "registry.docker.io"}),
            path: "spec.upstreams[0].auth",
            message: "realm",
            admission: Schema,
        },
        Case {
            what: "auth realm that is not an http URL",
            edit: |v| up(v, 0)["auth"] = serde_json::json!({"realm": "ftp://auth.docker.io/token", "service": "s"}),
            path: "spec.upstreams[0].auth.realm",
            message: "http",
            admission: Schema,
        },
        Case {
            what: "auth service with a quote",
            edit: |v| {
                up(v, 0)["auth"] = serde_json::json!({"realm": "https://auth.docker.io/token", "service": "a\"b"})
            },
            path: "spec.upstreams[0].auth.service",
            message: "",
            admission: Schema,
        },
        Case {
            what: "auth type None with credentials",
            edit: |v| {
                up(v, 0)["auth"] = serde_json::json!({"type": "None"});
                up(v, 0)["credentialsSecretRef"] = serde_json::json!({"name": "hub-creds"});
            },
            path: "spec.upstreams[0].auth.type",
            message: "sends no credentials",
            admission: Schema,
        },
        Case {
            what: "remoteURL of the wrong type",
            edit: |v| up(v, 0)["remoteURL"] = 443.into(),
            path: "spec.upstreams[0].remoteURL",
            message: "invalid type",
            admission: Schema,
        },
        Case {
            what: "no upstreams",
            edit: |v| v["spec"]["upstreams"] = Value::Array(vec![]),
            path: "spec.upstreams",
            message: "at least one upstream",
            admission: Schema,
        },
        Case {
            what: "proxy replicas zero",
            edit: |v| v["spec"]["proxy"]["replicas"] = 0.into(),
            path: "spec.proxy.replicas",
            message: "out of range",
            admission: Schema,
        },
        Case {
            what: "proxy replicas unbounded",
            edit: |v| v["spec"]["proxy"]["replicas"] = 500.into(),
            path: "spec.proxy.replicas",
            message: "out of range",
            admission: Schema,
        },
        Case {
            what: "two storage kinds",
            edit: |v| {
                v["spec"]["proxy"]["storage"]["s3"] = serde_json::json!({"bucket": "cache", "region": "eu-west-1"})
            },
            path: "spec.proxy.storage",
            message: "exactly one of",
            admission: Schema,
        },
        Case {
            what: "no storage kind",
            edit: |v| v["spec"]["proxy"]["storage"] = serde_json::json!({}),
            path: "spec.proxy.storage",
            message: "exactly one of",
            admission: Schema,
        },
        Case {
            what: "ttl not a duration",
            edit: |v| v["spec"]["proxy"]["ttl"] = "7 days".into(),
            path: "spec.proxy.ttl",
            message: "not a duration",
            admission: Schema,
        },
        Case {
            what: "dial timeout not a duration",
            edit: |v| v["spec"]["nodeConfig"]["containerd"] = serde_json::json!({"dialTimeout": "1 second"}),
            path: "spec.nodeConfig.containerd.dialTimeout",
            message: "not a Go duration",
            admission: Schema,
        },
        Case {
            what: "dial timeout too short",
            edit: |v| v["spec"]["nodeConfig"]["containerd"] = serde_json::json!({"dialTimeout": "50ms"}),
            path: "spec.nodeConfig.containerd.dialTimeout",
            message: "from 100ms to 30s",
            admission: Schema,
        },
        Case {
            what: "dial timeout too long",
            edit: |v| v["spec"]["nodeConfig"]["containerd"] = serde_json::json!({"dialTimeout": "1m"}),
            path: "spec.nodeConfig.containerd.dialTimeout",
            message: "from 100ms to 30s",
            admission: Schema,
        },
        Case {
            what: "cache low watermark not below the high one",
            edit: |v| v["spec"]["cache"] = serde_json::json!({"highWatermark": 70, "lowWatermark": 70}),
            path: "spec.cache.lowWatermark",
            message: "below highWatermark",
            admission: Schema,
        },
        Case {
            what: "cache low watermark above the default high one",
            edit: |v| v["spec"]["cache"] = serde_json::json!({"lowWatermark": 85}),
            path: "spec.cache.lowWatermark",
            message: "below highWatermark",
            admission: Schema,
        },
        Case {
            what: "cache high watermark over 100",
            edit: |v| v["spec"]["cache"] = serde_json::json!({"highWatermark": 120}),
            path: "spec.cache.highWatermark",
            message: "1..100",
            admission: Schema,
        },
        Case {
            what: "cache ttl not a duration",
            edit: |v| v["spec"]["cache"] = serde_json::json!({"ttl": "a week"}),
            path: "spec.cache.ttl",
            message: "not a Go duration",
            admission: Schema,
        },
        Case {
            what: "cache pin without a registry",
            edit: |v| v["spec"]["cache"] = serde_json::json!({"pins": ["nginx:1.27"]}),
            path: "spec.cache.pins[0]",
            message: "no registry",
            admission: Schema,
        },
        Case {
            what: "cache pin of a registry the mirror does not serve",
            edit: |v| v["spec"]["cache"] = serde_json::json!({"pins": ["unknown.example.com/team/app:v1"]}),
            path: "spec.cache.pins[0]",
            message: "not one of this mirror's upstreams",
            admission: Operator,
        },
        Case {
            what: "prefetch image without a tag",
            edit: |v| v["spec"]["prefetch"] = serde_json::json!({"images": ["docker.io/library/alpine"]}),
            path: "spec.prefetch.images[0]",
            message: "no tag or digest",
            admission: Schema,
        },
        Case {
            what: "prefetch of a registry the mirror does not serve",
            edit: |v| v["spec"]["prefetch"] = serde_json::json!({"images": ["unknown.example.com/app:1"]}),
            path: "spec.prefetch.images[0]",
            message: "not one of this mirror's upstreams",
            admission: Operator,
        },
        Case {
            what: "prefetch schedule not cron",
            edit: |v| {
                v["spec"]["prefetch"] =
                    serde_json::json!({"images": ["docker.io/library/alpine:3"], "schedule": "daily"})
            },
            path: "spec.prefetch.schedule",
            message: "cron",
            admission: Schema,
        },
        Case {
            what: "prefetch on s3 storage",
            edit: |v| {
                v["spec"]["proxy"]["storage"] =
                    serde_json::json!({"s3": {"bucket": "cache-bucket", "region": "eu-west-1"}});
                v["spec"]["prefetch"] = serde_json::json!({"images": ["docker.io/library/alpine:3"]});
            },
            path: "spec.prefetch",
            message: "needs emptyDir or persistentVolumeClaim",
            admission: Schema,
        },
        Case {
            what: "size limit not a quantity",
            edit: |v| v["spec"]["proxy"]["storage"]["emptyDir"]["sizeLimit"] = "lots".into(),
            path: "spec.proxy.storage.emptyDir.sizeLimit",
            message: "not a quantity",
            admission: Operator,
        },
        Case {
            what: "several replicas on a ReadWriteOnce claim",
            edit: |v| v["spec"]["proxy"]["storage"] = serde_json::json!({"persistentVolumeClaim": {"size": "50Gi"}}),
            path: "spec.proxy.replicas",
            message: "ReadWriteMany",
            admission: Schema,
        },
        Case {
            what: "unknown access mode",
            edit: |v| {
                v["spec"]["proxy"]["storage"] =
                    serde_json::json!({"persistentVolumeClaim": {"size": "50Gi", "accessModes": ["ReadOnlyMany"]}})
            },
            path: "spec.proxy.storage.persistentVolumeClaim.accessModes[0]",
            message: "ReadOnlyMany",
            admission: Schema,
        },
        Case {
            what: "cron schedule with four fields",
            edit: |v| v["spec"]["cleanup"]["schedule"] = "0 3 * *".into(),
            path: "spec.cleanup.schedule",
            message: "expected 5 fields",
            admission: Schema,
        },
        Case {
            what: "cron minute out of range",
            edit: |v| v["spec"]["cleanup"]["schedule"] = "61 3 * * 0".into(),
            path: "spec.cleanup.schedule",
            message: "out of range 0-59",
            admission: Operator,
        },
        Case {
            what: "unknown cleanup policy",
            edit: |v| v["spec"]["cleanup"]["policy"] = "delete-everything".into(),
            path: "spec.cleanup.policy",
            message: "unknown variant",
            admission: Schema,
        },
        Case {
            what: "edge domain with one label",
            edit: |v| v["spec"]["edge"]["domain"] = "localhost".into(),
            path: "spec.edge.domain",
            message: "at least two labels",
            admission: Schema,
        },
        Case {
            what: "https redirect without TLS",
            edit: |v| {
                v["spec"]["edge"].as_object_mut().unwrap().remove("tlsSecretRef");
                v["spec"]["edge"]["httpsRedirect"] = true.into();
            },
            path: "spec.edge.httpsRedirect",
            message: "needs tlsSecretRef",
            admission: Schema,
        },
        Case {
            what: "two upstreams on one edge host",
            edit: |v| {
                up(v, 0)["host"] = "hub.example.com".into();
                up(v, 1)["host"] = "hub.example.com".into();
            },
            path: "spec.upstreams[1].host",
            message: "already used",
            admission: Schema,
        },
        Case {
            what: "explicit host equal to another upstream's default host",
            edit: |v| up(v, 0)["host"] = "ghcr.mirror.example.com".into(),
            path: "spec.upstreams[1].host",
            message: "already used",
            admission: Operator,
        },
        Case {
            what: "node config with client auth but no node user",
            edit: |v| {
                v["spec"]["clientAuth"].as_object_mut().unwrap().remove("nodeUser");
            },
            path: "spec.clientAuth.nodeUser",
            message: "required when nodeConfig",
            admission: Schema,
        },
        Case {
            what: "node user missing from the users Secret",
            edit: |v| v["spec"]["clientAuth"]["nodeUser"] = "robot".into(),
            path: "spec.clientAuth.nodeUser",
            message: "not a key of Secret",
            admission: Operator,
        },
        Case {
            what: "users Secret missing",
            edit: |v| v["spec"]["clientAuth"]["usersSecretRef"]["name"] = "nowhere".into(),
            path: "spec.clientAuth.usersSecretRef",
            message: "not available",
            admission: Operator,
        },
        Case {
            what: "nodes via edge without TLS",
            edit: |v| {
                v["spec"]["edge"].as_object_mut().unwrap().remove("tlsSecretRef");
                v["spec"]["nodeConfig"]["via"] = "Edge".into();
            },
            path: "spec.nodeConfig.via",
            message: "needs edge with tlsSecretRef",
            admission: Schema,
        },
        Case {
            what: "relative certs dir",
            edit: |v| v["spec"]["nodeConfig"]["containerd"] = serde_json::json!({"certsDir": "etc/containerd/certs.d"}),
            path: "spec.nodeConfig.containerd.certsDir",
            message: "absolute directory",
            admission: Schema,
        },
        Case {
            what: "mirror name starting with a digit",
            edit: |v| v["metadata"]["name"] = "1fleet".into(),
            path: "metadata.name",
            message: "start with a letter",
            admission: Schema,
        },
        Case {
            what: "mirror name too long",
            edit: |v| v["metadata"]["name"] = "a".repeat(41).into(),
            path: "metadata.name",
            message: "at most 40",
            admission: Schema,
        },
        Case {
            what: "mirror plus upstream name too long",
            edit: |v| {
                v["metadata"]["name"] = "a".repeat(30).into();
                up(v, 0)["name"] = "b".repeat(30).into();
            },
            path: "spec.upstreams[0].name",
            message: "at most 56",
            admission: Schema,
        },
        Case {
            what: "peer endpoint with a path",
            edit: |v| v["spec"]["nodeConfig"]["peers"] = serde_json::json!({"endpoint": "http://${NODE_IP}:30020/v2/"}),
            path: "spec.nodeConfig.peers.endpoint",
            message: "is not http(s)://host[:port]",
            admission: Schema,
        },
        Case {
            what: "peer endpoint port out of range",
            edit: |v| v["spec"]["nodeConfig"]["peers"] = serde_json::json!({"endpoint": "http://127.0.0.1:99999"}),
            path: "spec.nodeConfig.peers.endpoint",
            message: "is not http(s)://host[:port]",
            admission: Operator,
        },
        Case {
            what: "peer dial timeout too long",
            edit: |v| {
                v["spec"]["nodeConfig"]["peers"] =
                    serde_json::json!({"endpoint": "http://127.0.0.1:4001", "dialTimeout": "1m"})
            },
            path: "spec.nodeConfig.peers.dialTimeout",
            message: "from 100ms to 30s",
            admission: Schema,
        },
        Case {
            what: "peer registry header not a header name",
            edit: |v| {
                v["spec"]["nodeConfig"]["peers"] =
                    serde_json::json!({"endpoint": "http://127.0.0.1:4001", "registryHeader": "X Registry"})
            },
            path: "spec.nodeConfig.peers.registryHeader",
            message: "is not an HTTP header name",
            admission: Schema,
        },
        Case {
            what: "network policy namespace not a name",
            edit: |v| v["spec"]["networkPolicy"] = serde_json::json!({"fromNamespaces": ["ci", "CI_Builds"]}),
            path: "spec.networkPolicy.fromNamespaces[1]",
            message: "not a namespace name",
            admission: Schema,
        },
        Case {
            what: "network policy range not a CIDR",
            edit: |v| v["spec"]["networkPolicy"] = serde_json::json!({"fromCIDRs": ["10.0.0/8"]}),
            path: "spec.networkPolicy.fromCIDRs[0]",
            message: "not a CIDR",
            admission: Schema,
        },
        Case {
            what: "network policy range with a bad prefix",
            edit: |v| v["spec"]["networkPolicy"] = serde_json::json!({"fromCIDRs": ["10.0.0.0/33"]}),
            path: "spec.networkPolicy.fromCIDRs[0]",
            message: "prefix length must be 0 to 32",
            admission: Operator,
        },
        Case {
            what: "network policy range with host bits",
            edit: |v| v["spec"]["networkPolicy"] = serde_json::json!({"fromCIDRs": ["10.1.2.3/16"]}),
            path: "spec.networkPolicy.fromCIDRs[0]",
            message: "the network is 10.1.0.0/16",
            admission: Operator,
        },
        Case {
            what: "misspelt field",
            edit: |v| {
                v["spec"]["proxy"]["replica"] = 3.into();
            },
            path: "spec.proxy.replica",
            message: "unknown field",
            admission: UnknownField,
        },
    ]
}

pub fn base() -> Value {
    serde_yaml::from_str(BASE).unwrap()
}
