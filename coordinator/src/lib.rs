//! The Coffer coordinator: stores agents' encrypted chunks in packs, keeps the catalog,
//! and commits snapshots only when every chunk they name is durable and their signature
//! verifies. It never holds keys or plaintext.

pub mod catalog;
pub mod certs;
pub mod config;
pub mod copyverify;
pub mod jobs;
pub mod metrics;
pub mod policy;
pub mod prune;
pub mod remote;
pub mod replicate;
pub mod retention;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod sessions;
pub mod store;
pub mod streams;
pub mod verify;
