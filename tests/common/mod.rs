//! Shared by the fast test crates: sample loading and object walking.
#![allow(dead_code)]

pub mod cases;

use std::path::{Path, PathBuf};

use mirrorfleet::render::{render_str, RenderOptions, Rendered};

pub const SAMPLES: &[&str] = &["public-mirrors", "minimal", "private-upstream", "restricted", "regional"];

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

pub fn sample_text(name: &str) -> String {
    std::fs::read_to_string(root().join(format!("config/samples/{name}.yaml"))).unwrap()
}

pub fn opts() -> RenderOptions {
    RenderOptions { namespace: "mirrors".into(), ..RenderOptions::default() }
}

pub fn render_sample(name: &str) -> Vec<Rendered> {
    render_str(&sample_text(name), &opts()).unwrap_or_else(|e| panic!("sample {name}: {e}"))
}

/// Every child as (kind/name, JSON value).
pub fn objects(r: &Rendered) -> Vec<(String, serde_json::Value)> {
    mirrorfleet::render::children_documents(&r.fleet.children, true)
        .into_iter()
        .map(|doc| {
            let v: serde_json::Value = serde_yaml::from_str(&doc).unwrap();
            (format!("{}/{}", v["kind"].as_str().unwrap(), v["metadata"]["name"].as_str().unwrap()), v)
        })
        .collect()
}
