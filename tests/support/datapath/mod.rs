//! The data path end to end (issue 5): a credentials-required upstream with a Bearer-token
//! service, the rendered proxies and Envoy edge, and clients that resolve the edge host names.
//! Used by `tests/datapath*.rs` and `benches/datapath.rs`.

pub mod faulty;
pub mod fleet;
pub mod tap;
pub mod token;

#[allow(unused_imports)]
pub use self::{
    fleet::{Fleet, FleetOptions, Storage},
    tap::{Tap, TapMode},
    token::{AuthUpstream, TokenServer},
};
