//! Golden files of the rendered samples: any change to what users get shows up in review.
//! `UPDATE_GOLDEN=1 cargo test --test render_golden` rewrites them.

mod common;

use mirrorfleet::render::to_yaml_stream;

#[test]
fn rendered_samples_match_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for name in common::SAMPLES {
        let rendered = common::render_sample(name);
        let mut out = to_yaml_stream(&rendered, false);
        for r in &rendered {
            for (path, content) in &r.fleet.files {
                out.push_str(&format!("--- # file: {path}\n{content}"));
            }
        }
        let golden = common::root().join(format!("tests/golden/{name}.yaml"));
        if update {
            std::fs::write(&golden, &out).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != out {
            let first = want.lines().zip(out.lines()).position(|(a, b)| a != b).unwrap_or(0);
            stale.push(format!(
                "{name}: first difference at line {}: golden {:?} / rendered {:?}",
                first + 1,
                want.lines().nth(first),
                out.lines().nth(first)
            ));
        }
    }
    assert!(stale.is_empty(), "golden files are stale (UPDATE_GOLDEN=1 to accept):\n{}", stale.join("\n"));
}
