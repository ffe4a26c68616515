//! `make bench`: how long rendering a large fleet takes. Prints medians over repeated runs
//! (these machines are noisy; a median and the spread say more than a mean).
//!
//! - the full `render` path (parse, validate, build, serialize) at the largest fleet the CRD
//!   admits (128 upstreams), with edge, client auth, cleanup and node config;
//! - the full `render` path for 1,000 upstreams as users can write them: 8 mirrors of 125 (the
//!   shape of `hack/render-fleet.sh`, which docs/benchmarks.md times as a whole process);
//!   Its parts that no builder change can remove: the YAML of the built fleet alone (serde-saphyr,
//!   and serde_yaml's libyaml emitter beside it on one thread) and the bcrypt hashing of the
//!   htpasswd Secrets (cached within a process, so the repeated render above does not pay it and a
//!   `mirrorfleet render` process does);
//! - the builders plus serialization at 1,000 upstreams in one mirror, past the schema's bound
//!   (the bound comes from the API server's CEL cost budget, not from rendering cost), to show
//!   scaling.

use std::time::{Duration, Instant};

use mirrorfleet::build::{build_valid, Inputs, Settings};
use mirrorfleet::render::{render_str, to_yaml_stream, RenderOptions, Rendered};

fn spec(upstreams: usize) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: users, namespace: bench}\nstringData: {ci: ci-password, nodes: nodes-password}\n---\n\
         apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: bench, namespace: bench, uid: 6f1c1f2e-0000-4000-8000-000000000001}\nspec:\n  upstreams:\n",
    );
    for i in 0..upstreams {
        s.push_str(&format!(
            "  - {{name: u{i}, registry: registry{i}.example.com, remoteURL: \"https://registry{i}.example.com\"}}\n"
        ));
    }
    s.push_str(
        "  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}\n  edge: {domain: mirror.example.com, tlsSecretRef: {name: tls}}\n  \
         cleanup: {schedule: \"0 3 * * 0\"}\n  nodeConfig: {fallbackToUpstream: true}\n",
    );
    s
}

fn measure(label: &str, runs: usize, mut f: impl FnMut() -> usize) {
    let mut times: Vec<Duration> = Vec::with_capacity(runs);
    let mut bytes = 0;
    f(); // warm-up
    for _ in 0..runs {
        let t = Instant::now();
        bytes = f();
        times.push(t.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label:<58} median {:>8.2} ms   min {:>8.2} ms   p90 {:>8.2} ms   output {:>6} KiB   ({runs} runs)",
        ms(times[runs / 2]),
        ms(times[0]),
        ms(times[runs * 9 / 10]),
        bytes / 1024
    );
}

/// A YAML serializer to compare.
trait Yaml {
    fn write<T: serde::Serialize>(&self, out: &mut String, doc: &T);
}
struct Saphyr;
impl Yaml for Saphyr {
    fn write<T: serde::Serialize>(&self, out: &mut String, doc: &T) {
        mirrorfleet::build::write_yaml(out, doc)
    }
}
struct Libyaml;
impl Yaml for Libyaml {
    fn write<T: serde::Serialize>(&self, out: &mut String, doc: &T) {
        out.push_str(&serde_yaml::to_string(doc).unwrap())
    }
}

/// The Deployments, Services and ConfigMaps of `rendered` (97 % of the output) as YAML.
fn one_thread_yaml(rendered: &[Rendered], yaml: impl Yaml) -> usize {
    let mut out = String::new();
    for r in rendered {
        let c = &r.fleet.children;
        c.deployments.iter().for_each(|d| yaml.write(&mut out, d));
        c.services.iter().for_each(|d| yaml.write(&mut out, d));
        c.config_maps.iter().for_each(|d| yaml.write(&mut out, d));
    }
    out.len()
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let opts = RenderOptions { namespace: "bench".into(), ..RenderOptions::default() };
    let runs = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);

    // Each mirror its own registries: two mirrors configuring one registry on the same nodes are
    // refused (`NodeConfigConflict`).
    let fleet = (0..8)
        .map(|m| {
            spec(125)
                .replace("name: bench,", &format!("name: fleet{m},"))
                .replace("mirror.example.com", &format!("m{m}.mirror.example.com"))
                .replace("registry: registry", &format!("registry: r{m}-registry"))
                .replace("//registry", &format!("//r{m}-registry"))
        })
        .collect::<Vec<_>>()
        .join("---\n");
    measure("render 8 mirrors x 125 upstreams (parse+validate+build+YAML)", runs, || {
        to_yaml_stream(&render_str(&fleet, &opts).unwrap(), false).len()
    });
    let built = render_str(&fleet, &opts).unwrap();
    measure("  of which the YAML of the built fleet (serde-saphyr)", runs, || to_yaml_stream(&built, false).len());
    measure("  the same documents on one thread: serde-saphyr", runs, || one_thread_yaml(&built, Saphyr));
    measure("  the same documents on one thread: serde_yaml (libyaml)", runs, || one_thread_yaml(&built, Libyaml));
    // A fresh salt per hash: nothing cached, as in a new `mirrorfleet render` process.
    let mut salt = 0u8;
    measure("  htpasswd of 8 mirrors x 2 users (bcrypt, one thread)", runs, || {
        (0..16)
            .map(|_| {
                salt = salt.wrapping_add(1);
                bcrypt::hash_with_salt("ci-password", mirrorfleet::build::auth::BCRYPT_COST, [salt; 16]).unwrap();
                60
            })
            .sum()
    });

    let text = spec(mirrorfleet::api::MAX_UPSTREAMS);
    measure("render 128 upstreams (parse+validate+build+YAML)", runs, || {
        to_yaml_stream(&render_str(&text, &opts).unwrap(), true).len()
    });

    // 1,000 upstreams: the schema refuses this many, so build the validated value directly.
    let big = spec(1000);
    let rendered = render_str(&spec(1), &opts).unwrap();
    let mut mirror = rendered[0].mirror.clone();
    let parsed: serde_yaml::Value =
        serde_yaml::Deserializer::from_str(&big).nth(1).map(|d| serde::Deserialize::deserialize(d).unwrap()).unwrap();
    mirror.spec = serde_yaml::from_value(parsed["spec"].clone()).unwrap();
    let inputs = Inputs {
        client_users: Some([("ci".into(), "ci-password".into()), ("nodes".into(), "nodes-password".into())].into()),
        ..Inputs::default()
    };
    let settings = Settings::default();
    measure("build 1000 upstreams (builders only)", runs, || {
        build_valid(&mirror, &inputs, &settings).children.deployments.len()
    });
    measure("build + YAML 1000 upstreams", runs, || {
        let fleet = build_valid(&mirror, &inputs, &settings);
        to_yaml_stream(&[Rendered { mirror: mirror.clone(), fleet }], true).len()
    });
}
