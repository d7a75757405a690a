//! The agent runtime: what every agent binary is built from.
//!
//! An agent implements [`Source`] for its data source; the runtime does the rest: the
//! coordinator session ([`client`]), the keyring, the streaming backup pipeline
//! ([`backup`]), verified parallel restore ([`restore`]), progress reporting and the
//! command line every agent shares ([`cli`]).

pub mod backup;
pub mod cli;
pub mod client;
pub mod command;
pub mod daemon;
pub mod direct;
pub mod progress;
pub mod restore;
pub mod retry;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

pub use backup::{BackupSink, BackupStats, DigestSlot};
pub use client::{ClientError, Coordinator};
pub use restore::{FileCheck, SnapshotReader};

use crate::manifest::Manifest;

/// What a source found when probed: enough for an operator to see that it is reachable.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub description: String,
    pub details: BTreeMap<String, String>,
}

/// Result of checking a restored target against its manifest.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub ok: bool,
    pub checks: Vec<String>,
    pub problems: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source holds something that must not be backed up (e.g. private key material).
    #[error("refused: {0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl SourceError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SourceError {
        let context = context.into();
        move |source| SourceError::Io { context, source }
    }
}

/// A data source an agent protects. Implementations hold only what is specific to their
/// source; chunking, encryption, upload, commit and verified download are the runtime's.
pub trait Source: Send + Sync {
    /// Asset kind (`git`, `postgres`, ...): the part of the asset name before `/`.
    fn kind(&self) -> &'static str;

    /// zstd level for this source's chunks (`--compression-level` overrides it).
    fn compression_level(&self) -> i32 {
        crate::crypto::DEFAULT_ZSTD_LEVEL
    }

    /// A per-chunk refinement of [`Source::compression_level`]: given a chunk's plaintext and
    /// that level, the level for this chunk (`--compression-level` overrides it too).
    fn chunk_level(&self) -> Option<backup::ChunkLevel> {
        None
    }

    /// Checks that the source is reachable and describes it.
    fn probe(&self) -> impl Future<Output = Result<Probe, SourceError>> + Send;

    /// Streams one recovery point into `sink` (files via [`BackupSink::add_file`]) and returns
    /// the source metadata recorded in the manifest. `sink.previous()` is the asset's newest
    /// snapshot, for incremental sources.
    fn backup(
        &self,
        sink: &mut BackupSink,
    ) -> impl Future<Output = Result<BTreeMap<String, serde_json::Value>, SourceError>> + Send;

    /// Restores a snapshot into `target`, reading verified file contents from `reader`.
    fn restore(&self, reader: &SnapshotReader, target: &Path) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Checks a restored target against the manifest it was restored from.
    fn verify(
        &self,
        manifest: &Manifest,
        target: &Path,
    ) -> impl Future<Output = Result<VerifyReport, SourceError>> + Send;
}
