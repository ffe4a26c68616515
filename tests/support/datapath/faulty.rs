//! The upstream of the upstream-sidecar tests (`tests/upstream_sidecar.rs`, `tests/upstream_s3.rs`):
//! Distribution with Bearer-token auth behind a TCP tap, and the faults those tests set on it.

use std::any::Any;
use std::path::PathBuf;
use std::time::Duration;

use super::token::TokenRequest;
use super::{AuthUpstream, Tap, TapMode};
use crate::support::agent::Blackhole;
use crate::support::{tool, wait_until, Envoy};

/// A token-auth upstream reached through a tap (the address a proxy's sidecar is given).
pub struct FaultyUpstream {
    // Drop order: the tap before the upstream it forwards to.
    tap: Option<Tap>,
    tap_addr: String,
    upstream: AuthUpstream,
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
}

impl FaultyUpstream {
    pub fn start(user: &str, password: &str) -> FaultyUpstream {
        let upstream = AuthUpstream::start(user, password);
        let tap = Tap::start(upstream.addr());
        FaultyUpstream { tap_addr: tap.addr().to_string(), tap: Some(tap), upstream }
    }

    /// The tap's address: the upstream as the proxy reaches it.
    pub fn addr(&self) -> &str {
        &self.tap_addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.tap_addr)
    }

    pub fn upstream(&self) -> &AuthUpstream {
        &self.upstream
    }

    /// Registry requests the upstream answered (its access log; not the sidecar's health checks).
    pub fn requests(&self) -> usize {
        self.upstream
            .log()
            .lines()
            .filter(|l| (l.contains("\"GET /v2/") || l.contains("\"HEAD /v2/")) && !l.contains("Envoy/HC"))
            .count()
    }

    /// Token requests a registry made (the sidecar's health checks ask for no scope).
    pub fn tokens(&self) -> Vec<TokenRequest> {
        self.upstream.token_server().requests().into_iter().filter(|t| !t.scopes.is_empty()).collect()
    }

    /// iptables DROP of new connections to the upstream and its realm, and the tap swallowing the
    /// open ones, until the guard is given to [`FaultyUpstream::restore`].
    pub fn blackhole(&self) -> Box<dyn Any> {
        let guards =
            (Blackhole::port(port_of(&self.tap_addr)), Blackhole::port(port_of(self.upstream.token_server().addr())));
        self.tap.as_ref().expect("the tap runs").set_mode(TapMode::Blackhole);
        Box::new(guards)
    }

    /// Connections accepted, never answered.
    pub fn hang(&self) {
        self.tap.as_ref().expect("the tap runs").set_mode(TapMode::Blackhole);
    }

    /// Nothing listens at the upstream's address (open connections close).
    pub fn refuse(&mut self) {
        self.tap = None;
    }

    /// Something else listens at the upstream's address (`start` gets it) until the guard is
    /// given to [`FaultyUpstream::restore`].
    pub fn replace<T: Any>(&mut self, start: impl FnOnce(&str) -> T) -> Box<dyn Any> {
        self.tap = None;
        Box::new(start(&self.tap_addr))
    }

    /// Undoes a fault and waits until `sidecar` sees registry and realm healthy again (neither
    /// health-check failed nor ejected: `healthy` is then the only flag), so the next fault is met
    /// fresh (its first request pays the whole timeout, the worst case).
    pub fn restore(&mut self, guard: Option<Box<dyn Any>>, sidecar: &Envoy) {
        drop(guard);
        match &self.tap {
            Some(tap) => tap.set_mode(TapMode::Forward),
            None => self.tap = Some(Tap::start_on(&self.tap_addr, self.upstream.addr())),
        }
        let healthy = [
            format!("registry::{}::health_flags::healthy\n", self.tap_addr),
            format!("realm::{}::health_flags::healthy\n", self.upstream.token_server().addr()),
        ];
        let both = || {
            let clusters = sidecar.clusters();
            healthy.iter().all(|h| clusters.contains(h.as_str())).then_some(())
        };
        assert!(
            wait_until(Duration::from_secs(15), both).is_some(),
            "the sidecar never saw the upstream back:\n{}",
            sidecar.clusters()
        );
    }
}

/// The Distribution binaries to run a proxy with: Debian's 2.8 and, if given, 3.x.
pub fn distribution_binaries() -> Vec<(String, PathBuf)> {
    let mut list = Vec::new();
    if let Some(bin) = tool("docker-registry") {
        list.push(("2.8".to_string(), bin));
    }
    match std::env::var("MIRRORFLEET_REGISTRY_V3").ok().filter(|v| !v.is_empty()) {
        Some(bin) => list.push(("3.x".to_string(), PathBuf::from(bin))),
        // No package registry carries Distribution 3.x (it is built from a public snapshot, outside
        // the repository), so CI runs the 2.8 half; the 3.x half runs wherever the binary is given.
        None => eprintln!("SKIP Distribution 3.x: MIRRORFLEET_REGISTRY_V3 is not set (2.8 only)"),
    }
    list
}
