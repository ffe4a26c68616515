//! Fuzz-ish: the node agent reads files other people wrote (hosts.toml, containerd's config.toml,
//! daemon.json, registries.conf drop-ins, its own records after someone edited them) and the
//! node config from the API. None of that may panic it, and whatever it does not own must come
//! out byte-identical. Inputs are random bytes and random mutations of realistic files, from a
//! fixed seed (set `AGENT_FUZZ_SEED` / `AGENT_FUZZ_ROUNDS`, or `AGENT_FUZZ_SECONDS` for a timed run, to explore further).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use mirrorfleet::agent::apply::{apply, Inputs};
use mirrorfleet::agent::probe::Health;
use mirrorfleet::agent::{containerd, docker, files};
use mirrorfleet::build::node::NodeConfig;

const ME: &str = "mirrors/public";

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const SEEDS_TEXT: &[&str] = &[
    "# managed-by: mirrorfleet (RegistryMirror mirrors/public); this file is rewritten\nserver = \"x\"\n[host.\"http://m\"]\n",
    "# managed-by: mirrorfleet (RegistryMirror other/one)\n",
    "server = \"https://registry-1.docker.io\"\n\n[host.\"http://10.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry.mirrors.\"docker.io\"]\nendpoint = [\"http://m\"]\n",
    "{\"registry-mirrors\": [\"https://a\"], \"log-level\": \"info\"}",
    "{\"registry-mirrors\": \"oops\"}",
    "# managed-by: mirrorfleet (RegistryMirror mirrors/public)\n{\"registry-mirrors\": [\"http://m\"]}\n",
    "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"m:5000\"\n",
    "",
    "\u{feff}# managed-by: mirrorfleet (RegistryMirror mirrors/public)\n",
    "# managed-by: mirrorfleet (RegistryMirror mirrors/public\n",
];

/// A realistic file, mutated: truncated, bytes flipped, random bytes spliced in.
fn mutated(rng: &mut Rng) -> Vec<u8> {
    let mut v = rng.pick(SEEDS_TEXT).as_bytes().to_vec();
    for _ in 0..rng.below(4) {
        match rng.below(4) {
            0 if !v.is_empty() => {
                let cut = rng.below(v.len());
                v.truncate(cut);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let junk = rng.bytes(16);
                v.splice(i..i, junk);
            }
            _ => {}
        }
    }
    v
}

fn input(rng: &mut Rng) -> Vec<u8> {
    if rng.below(3) == 0 {
        rng.bytes(300)
    } else {
        mutated(rng)
    }
}

/// `rounds` rounds, or with `AGENT_FUZZ_SECONDS` (the `make fuzz` run) as many as fit in that time.
fn keep_going(start: std::time::Instant, round: usize, rounds: usize) -> bool {
    match std::env::var("AGENT_FUZZ_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(secs) => start.elapsed().as_secs() < secs,
        None => round < rounds,
    }
}

fn seed() -> (u64, usize) {
    let seed = std::env::var("AGENT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_abcd_0001);
    let rounds = std::env::var("AGENT_FUZZ_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    (seed | 1, rounds)
}

#[test]
fn parsers_of_foreign_text_never_panic() {
    let (seed, rounds) = seed();
    let mut rng = Rng(seed);
    let (start, mut round) = (std::time::Instant::now(), 0);
    while keep_going(start, round, rounds) {
        round += 1;
        let bytes = input(&mut rng);
        let _ = files::owner_of_bytes(&bytes, ME);
        let text = String::from_utf8_lossy(&bytes);
        let check = containerd::check_config(&text, "config.toml", "/etc/containerd/certs.d");
        let _ = (check.blocks(), check.describe());
        if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let _ = docker::merge(obj, &["http://m".into()], &["http://n".into()]);
        }
        // The node config arrives from the API; a broken one must be an error, not a crash.
        let _ = serde_json::from_slice::<NodeConfig>(&bytes);
    }
    eprintln!("parsers: {round} inputs in {:.1} s (seed {seed:#x})", start.elapsed().as_secs_f64());
}

fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let key = e.path().strip_prefix(root).unwrap().display().to_string();
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.file_type().is_symlink() {
                out.insert(key, format!("-> {}", fs::read_link(e.path()).unwrap().display()).into_bytes());
            } else {
                out.insert(key, fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_pass_over_a_directory_of_random_files_never_panics_and_leaves_foreign_files_alone() {
    let (seed, rounds) = seed();
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let registries = ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io:5000"];
    let (start, mut round) = (std::time::Instant::now(), 0);
    while keep_going(start, round, rounds / 10) {
        round += 1;
        let root = tempfile::tempdir().unwrap();
        let certs = root.path().join("certs.d");
        let etc = root.path().join("etc");
        fs::create_dir_all(&certs).unwrap();
        fs::create_dir_all(&etc).unwrap();
        // Whatever an admin, another tool or a crash may have left around.
        for _ in 0..rng.below(6) {
            let dir = certs.join(rng.pick(&registries));
            fs::create_dir_all(&dir).unwrap();
            // Setup may collide with what an earlier iteration put there; that is fine.
            let _ = match rng.below(5) {
                0 => std::os::unix::fs::symlink("/etc/hostname", dir.join("hosts.toml")),
                1 => fs::create_dir_all(dir.join("hosts.toml")),
                2 => fs::write(dir.join(".hosts.toml.mirrorfleet-0123.tmp"), input(&mut rng)),
                _ => fs::write(dir.join("hosts.toml"), input(&mut rng)),
            };
        }
        if rng.below(2) == 0 {
            fs::write(etc.join("daemon.json"), input(&mut rng)).unwrap();
        }
        if rng.below(2) == 0 {
            fs::write(etc.join(".mirrorfleet-mirrors-public.json"), input(&mut rng)).unwrap();
        }
        if rng.below(2) == 0 {
            fs::write(etc.join("mirrorfleet-mirrors-public.conf"), input(&mut rng)).unwrap();
        }
        let containerd_config = root.path().join("config.toml");
        fs::write(&containerd_config, input(&mut rng)).unwrap();
        let before = snapshot(root.path());

        let config: NodeConfig = serde_json::from_value(serde_json::json!({
            "mirror": ME,
            "containerd": {"certsDir": certs.display().to_string()},
            "authenticate": rng.below(2) == 0,
            "removing": rng.below(4) == 0,
            "registries": registries.iter().take(1 + rng.below(registries.len())).map(|r| serde_json::json!({
                "registry": r, "upstream": "u", "mirror": "http://10.0.0.1:5000",
                "fallback": if rng.below(2) == 0 { Some("https://up.example") } else { None },
            })).collect::<Vec<_>>(),
            "crio": {"dropInDir": etc.display().to_string()},
            "docker": {"daemonJson": etc.join("daemon.json").display().to_string()},
            "peer": (rng.below(2) == 0).then(|| serde_json::json!({
                "endpoint": "http://${NODE_IP}:30020", "dialTimeout": "200ms",
                "registryHeader": (rng.below(2) == 0).then_some("X-Dragonfly-Registry"),
            })),
        }))
        .unwrap();
        let health_of = |rng: &mut Rng| match rng.below(3) {
            0 => Health::Up,
            1 => Health::Down { reason: "fuzz".into() },
            _ => Health::Unknown,
        };
        const PEER: &str = "http://10.0.0.9:30020";
        let health = BTreeMap::from([
            ("http://10.0.0.1:5000".to_string(), health_of(&mut rng)),
            (PEER.to_string(), health_of(&mut rng)),
        ]);
        let peer_endpoint = config.peer.as_ref().map(|_| if rng.below(4) == 0 { Err("no NODE_IP") } else { Ok(PEER) });
        let auth = (rng.below(2) == 0).then_some("Basic Zm9vOmJhcg==");
        let report = apply(&Inputs {
            config: &config,
            authorization: auth,
            health: &health,
            containerd_config: Some(&containerd_config),
            peer_endpoint,
        });
        let _ = (report.problems(), report.applied(), serde_json::to_string(&report).unwrap());

        // Every file that was not ours before the pass is exactly as it was (daemon.json is
        // merged, not owned: only its registry-mirrors may change, checked in docker's tests).
        let after = snapshot(root.path());
        for (path, content) in &before {
            if path.ends_with("daemon.json") {
                continue;
            }
            let ours = files::owner_of_bytes(content, ME) == files::Owner::Us && !content.starts_with(b"-> ");
            if !ours {
                assert_eq!(after.get(path), Some(content), "round {round}: foreign {path} changed");
            }
        }
    }
    eprintln!("directory passes: {round} in {:.1} s (seed {seed:#x})", start.elapsed().as_secs_f64());
}
