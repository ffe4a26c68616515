//! Parsing a RegistryMirror from YAML the way a person wrote it: every field the API does not
//! know is reported with its path and, when one is close, the field that was probably meant
//! (`spec.upstream` → `upstreams`), next to any type error or missing field. `render` uses it; in a
//! cluster the API server prunes or refuses unknown fields itself (strict field validation), so the
//! controller never receives them.
//!
//! The known names come from the generated CRD schema, so they are the API's own spelling.

use std::sync::LazyLock;

use serde_json::Value;

use super::validate::{InvalidSpec, Problem};
use super::RegistryMirror;

/// The CRD's openAPIV3Schema of the served version, as JSON.
static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = super::crd::crd();
    let schema = crd.spec.versions.first().and_then(|v| v.schema.as_ref()).and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema).unwrap_or(Value::Null)
});

/// Parses one RegistryMirror document. `Ok` carries the mirror and the problems of unknown fields
/// (the caller decides whether they are fatal); `Err` lists a type error or missing field together
/// with the unknown fields found before it (often its cause).
pub fn parse_mirror(value: serde_yaml::Value) -> Result<(RegistryMirror, Vec<Problem>), InvalidSpec> {
    let mut unknown = Vec::new();
    let parsed: Result<RegistryMirror, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut |path: serde_ignored::Path| {
            unknown.push(path.to_string())
        }));
    let mut problems: Vec<Problem> = unknown
        .iter()
        .map(|p| field_path(p))
        .filter(|p| !p.starts_with("status") && p != "apiVersion" && p != "kind")
        .map(|path| unknown_field(&path))
        .collect();
    match parsed {
        Ok(mirror) => Ok((mirror, problems)),
        Err(e) => {
            let path = e.path().to_string();
            problems.push(Problem {
                path: if path == "." { "(top level)".into() } else { path },
                message: e.inner().to_string(),
            });
            Err(InvalidSpec(problems))
        }
    }
}

/// serde_ignored writes list indexes as path segments (`spec.upstreams.0.hots`) and an `Option`
/// as `?`; the rest of the operator writes `spec.upstreams[0].hots`.
fn field_path(ignored: &str) -> String {
    let mut out = String::new();
    for segment in ignored.split('.').filter(|s| *s != "?") {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

fn unknown_field(path: &str) -> Problem {
    let (parent, name) = match path.rfind('.') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    };
    let known = known_fields(parent);
    let message = match suggestion(name, &known) {
        Some(meant) => format!("unknown field {name:?}; did you mean {meant:?}?"),
        None if known.is_empty() => format!("unknown field {name:?}"),
        None => format!("unknown field {name:?}; known here: {}", known.join(", ")),
    };
    Problem { path: path.to_string(), message }
}

/// The field names the schema declares at `parent` (`spec.upstreams[0]`), empty when the path
/// leads nowhere known.
pub fn known_fields(parent: &str) -> Vec<String> {
    let mut node = &*SCHEMA;
    for segment in parent.split('.').filter(|s| !s.is_empty()) {
        let (name, indexes) = match segment.find('[') {
            Some(i) => (&segment[..i], segment[i..].matches('[').count()),
            None => (segment, 0),
        };
        node = &node["properties"][name];
        for _ in 0..indexes {
            node = &node["items"];
        }
    }
    node["properties"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// The known field closest to `name`: same letters ignoring case, or within a small edit
/// distance (1 for short names, 2 from six letters on), or one a prefix of the other.
pub fn suggestion<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    let budget = if name.len() >= 6 { 2 } else { 1 };
    known
        .iter()
        .filter_map(|k| {
            let kl = k.to_ascii_lowercase();
            let d = edit_distance(&lower, &kl);
            let prefix = lower.len() >= 4 && (kl.starts_with(&lower) || lower.starts_with(&kl));
            (d <= budget || prefix).then_some((d, k.as_str()))
        })
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance, with a transposition counting as one edit (`upsteram`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<(RegistryMirror, Vec<Problem>), InvalidSpec> {
        parse_mirror(serde_yaml::from_str(yaml).unwrap())
    }

    const HEAD: &str = "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: m}\n";

    #[test]
    fn a_misspelt_required_field_is_named_with_the_one_meant() {
        let err = parse(&format!("{HEAD}spec:\n  upstream:\n  - {{name: hub, registry: docker.io, remoteURL: https://registry-1.docker.io}}\n"))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(r#"spec.upstream: unknown field "upstream"; did you mean "upstreams"?"#), "{text}");
        assert!(text.contains("missing field `upstreams`"), "{text}");
    }

    #[test]
    fn unknown_fields_in_lists_get_index_paths_and_suggestions() {
        let (_, problems) = parse(&format!(
            "{HEAD}spec:\n  upstreams:\n  - {{name: hub, registry: docker.io, remoteURL: https://registry-1.docker.io, hots: a.b.c}}\n  proxy: {{replica: 3}}\n  nodeconfig: {{}}\n"
        ))
        .unwrap();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                r#"spec.upstreams[0].hots: unknown field "hots"; did you mean "host"?"#,
                r#"spec.proxy.replica: unknown field "replica"; did you mean "replicas"?"#,
                r#"spec.nodeconfig: unknown field "nodeconfig"; did you mean "nodeConfig"?"#,
            ]
        );
    }

    #[test]
    fn a_field_nothing_resembles_lists_what_is_known() {
        let (_, problems) = parse(&format!(
            "{HEAD}spec:\n  upstreams: [{{name: hub, registry: docker.io, remoteURL: https://registry-1.docker.io}}]\n  cleanup: {{schedule: '0 3 * * 0', when: now}}\n"
        ))
        .unwrap();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].message.contains("known here: ") && problems[0].message.contains("schedule"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn suggestions_are_close_or_nothing() {
        let known: Vec<String> = ["upstreams", "proxy", "clientAuth", "edge"].map(String::from).to_vec();
        assert_eq!(suggestion("upsteams", &known), Some("upstreams"));
        assert_eq!(suggestion("clientauth", &known), Some("clientAuth"));
        assert_eq!(suggestion("edeg", &known), Some("edge"));
        assert_eq!(suggestion("tls", &known), None);
        assert!(known_fields("spec.upstreams[3]").contains(&"remoteURL".to_string()));
    }
}
