//! mirrorfleet: a Kubernetes operator that runs fleets of container-registry mirrors and points
//! every node's container runtime at them.
//!
//! - [`api`]: the `RegistryMirror` resource, its CRD and its validation.
//! - [`build`]: pure builders from a mirror to every child object and config file.
//! - [`render`]: the no-cluster path (`mirrorfleet render`).
//! - [`cleanup`]: the cache cleanup Job (`mirrorfleet cleanup`), run by each mirror's CronJob.
//! - [`controller`]: `mirrorfleet run`, the controller that keeps every mirror's fleet converged.
//! - [`agent`]: the node agent (`mirrorfleet node-agent`), which writes each node's runtime config.
//! - [`client`]: the API client they share: its read timeout and the watch timeout below it.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod build;
pub mod cache;
pub mod cleanup;
pub mod client;
pub mod controller;
pub mod render;
