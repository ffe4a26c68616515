//! mirrorfleet: a Kubernetes operator that runs fleets of container-registry mirrors and points
//! every node's container runtime at them.
//!
//! - [`api`]: the `RegistryMirror` resource, its CRD and its validation.
//! - [`build`]: pure builders from a mirror to every child object and config file.
//! - [`render`]: the no-cluster path (`mirrorfleet render`).
#![forbid(unsafe_code)]

pub mod api;
pub mod build;
pub mod render;
