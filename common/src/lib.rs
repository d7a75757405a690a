//! Coffer's shared core.
//!
//! The sans-IO half (`chunker`, `crypto`, `manifest`, `signing`, `keyring`, `units`) is plain
//! functions and types with no sockets, files or runtime: it is what every agent, the
//! coordinator and the tools agree on byte for byte. The IO half (`identity`, `tls`,
//! `telemetry`, `runtime`) is the agent runtime every agent binary is built from.

pub mod chunker;
pub mod crypto;
pub mod identity;
pub mod keyring;
pub mod layered;
pub mod manifest;
pub mod pgwal;
pub mod runtime;
pub mod signing;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod units;

/// Version of this build, reported in Hello and in manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
