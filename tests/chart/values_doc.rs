//! The values table of the chart README, from values.yaml's `# --` comments (the helm-docs
//! convention): a key with a `# --` comment is one row (its whole value is the default); a map
//! without one is descended into; any other key without one is an error, so no value goes
//! undocumented.
#![allow(dead_code)]

use serde_json::Value;

pub const BEGIN: &str = "<!-- values:begin (generated from values.yaml by tests/chart.rs; `make generate`) -->";
pub const END: &str = "<!-- values:end -->";

#[derive(Debug)]
pub struct Row {
    pub key: String,
    pub default: String,
    pub description: String,
}

/// Rows in file order.
pub fn rows(text: &str, values: &Value) -> Result<Vec<Row>, String> {
    let key_line = regex::Regex::new(r"^( *)([A-Za-z0-9_]+):(?: |$)").unwrap();
    let mut rows = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut doc: Option<String> = None;
    let mut errors = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("# --") {
            doc = Some(rest.trim().to_string());
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('#') {
            // Continuation of a `# --` block; other comments end it.
            if let Some(d) = doc.as_mut() {
                if !rest.trim().is_empty() {
                    d.push(' ');
                    d.push_str(rest.trim());
                }
            }
            continue;
        }
        if trimmed.is_empty() {
            if doc.is_some() {
                errors.push(format!("line {}: a `# --` comment must sit right above its key", no + 1));
                doc = None;
            }
            continue;
        }
        let Some(c) = key_line.captures(line) else {
            continue; // list items and values of a documented key
        };
        let indent = c[1].len();
        while path.last().is_some_and(|(i, _)| *i >= indent) {
            path.pop();
        }
        // Keys inside a documented key's value belong to its default.
        if path.iter().any(|(_, k)| k.starts_with('\u{0}')) {
            continue;
        }
        let name = c[2].to_string();
        let key = path.iter().map(|(_, k)| k.as_str()).chain([name.as_str()]).collect::<Vec<_>>().join(".");
        let value = key.split('.').fold(values, |v, k| &v[k]);
        match doc.take() {
            Some(description) => {
                rows.push(Row { key: key.clone(), default: default_of(value), description });
                path.push((indent, format!("\u{0}{name}")));
            }
            None if value.as_object().is_some_and(|m| !m.is_empty()) => path.push((indent, name)),
            None => errors.push(format!("line {}: {key} has no `# --` comment", no + 1)),
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors.join("\n"))
    }
}

fn default_of(value: &Value) -> String {
    match value {
        Value::String(s) if s.is_empty() => "`\"\"`".to_string(),
        Value::String(s) => format!("`{s}`"),
        other => format!("`{}`", other.to_string().replace('|', "\\|")),
    }
}

pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from("| Key | Default | Description |\n| --- | --- | --- |\n");
    for r in rows {
        out.push_str(&format!("| `{}` | {} | {} |\n", r.key, r.default, r.description.replace('|', "\\|")));
    }
    out
}

/// `readme` with the text between the markers replaced by `table`.
pub fn replace_between_markers(readme: &str, table: &str) -> Option<String> {
    let start = readme.find(BEGIN)? + BEGIN.len();
    let end = readme[start..].find(END)? + start;
    Some(format!("{}\n{}{}", &readme[..start], table, &readme[end..]))
}
