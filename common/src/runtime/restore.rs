//! Verified restore: chunks are fetched in parallel batches, decrypted and checked on
//! blocking threads, reassembled in order, and every file's SHA-256 is compared with the
//! signed manifest before the restore is reported good.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use coffer_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::client::{ClientError, Coordinator, SignedManifest};
use super::progress::Progress;
use crate::crypto::{ChunkCipher, FileHasher};
use crate::keyring::Keyring;
use crate::manifest::{ChunkRef, FileEntry, Manifest};

#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Download streams in flight at once.
    pub parallel: usize,
    /// Target plaintext bytes per download batch.
    pub batch_bytes: usize,
    pub quiet: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { parallel: 4, batch_bytes: 8 << 20, quiet: false }
    }
}

pub struct SnapshotReader {
    coord: Coordinator,
    cipher: Arc<ChunkCipher>,
    signed: SignedManifest,
    opts: RestoreOptions,
    progress: Progress,
}

impl SnapshotReader {
    /// Fetches and verifies the manifest of `snapshot` (an id or `latest`).
    pub async fn open(
        coord: &Coordinator,
        keyring: &Keyring,
        asset: &str,
        snapshot: &str,
        opts: RestoreOptions,
    ) -> Result<SnapshotReader, ClientError> {
        let signed = coord
            .manifest(asset, snapshot)
            .await?
            .ok_or_else(|| ClientError::NoSnapshot { asset: asset.to_string(), snapshot: snapshot.to_string() })?;
        let total = signed.manifest.total_size();
        Ok(SnapshotReader {
            coord: coord.clone(),
            cipher: Arc::new(keyring.cipher()),
            signed,
            opts,
            progress: Progress::start("restore", Some(total), opts.quiet),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.signed.manifest
    }

    pub fn signed(&self) -> &SignedManifest {
        &self.signed
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn corrupt(&self, detail: String) -> ClientError {
        ClientError::Corrupt { snapshot: self.signed.info.id.clone(), detail }
    }

    /// Writes the verified contents of file `path` to a new file at `dest` (fsynced).
    pub async fn restore_to_path(&self, path: &str, dest: &Path) -> Result<(), ClientError> {
        let io = |context: String| move |source| ClientError::Io { context, source };
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let f = std::fs::File::create(dest).map_err(io(format!("creating {}", dest.display())))?;
        let f = self.restore_file(path, std::io::BufWriter::with_capacity(1 << 20, f)).await?;
        let f = f
            .into_inner()
            .map_err(|e| ClientError::Io { context: format!("writing {}", dest.display()), source: e.into_error() })?;
        f.sync_all().map_err(io(format!("syncing {}", dest.display())))
    }

    /// Streams the verified contents of file `path` into `writer` and returns it.
    pub async fn restore_file<W: Write + Send + 'static>(&self, path: &str, writer: W) -> Result<W, ClientError> {
        let entry = self.manifest().file(path).ok_or_else(|| self.corrupt(format!("has no file {path:?}")))?.clone();
        let (tx, mut rx) = mpsc::channel::<Vec<Vec<u8>>>(2);
        let progress = self.progress.clone();
        let writer_task = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let mut hasher = FileHasher::default();
            let mut size = 0u64;
            while let Some(batch) = rx.blocking_recv() {
                for chunk in batch {
                    hasher.update(&chunk);
                    writer.write_all(&chunk)?;
                    size += chunk.len() as u64;
                    progress.add(chunk.len() as u64);
                }
            }
            writer.flush()?;
            Ok::<_, std::io::Error>((writer, size, hasher.finish()))
        });

        let batches = batch_refs(&entry.chunks, self.opts.batch_bytes);
        let mut fetched =
            futures::stream::iter(batches).map(|b| self.fetch_batch(&entry, b)).buffered(self.opts.parallel);
        let mut failure = None;
        while let Some(batch) = fetched.next().await {
            match batch {
                Ok(b) => {
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer_task.await.map_err(|e| ClientError::Protocol(format!("writer thread: {e}")))?;
        if let Some(e) = failure {
            return Err(e);
        }
        let (writer, size, sha) =
            written.map_err(|source| ClientError::Io { context: format!("writing {path}"), source })?;
        if size != entry.size || hex::encode(sha) != entry.sha256 {
            return Err(self.corrupt(format!(
                "file {path:?} restored to {size} bytes with SHA-256 {} but the manifest says {} bytes, {}",
                hex::encode(sha),
                entry.size,
                entry.sha256
            )));
        }
        Ok(writer)
    }

    async fn fetch_batch(&self, entry: &FileEntry, refs: Vec<ChunkRef>) -> Result<Vec<Vec<u8>>, ClientError> {
        let ids: Vec<Vec<u8>> = refs.iter().map(|r| r.0.0.to_vec()).collect();
        let asset = self.manifest().asset.clone();
        let frames = self
            .coord
            .retry
            .run("DownloadChunks", || {
                let mut c = self.coord.raw();
                let req = pb::DownloadChunksRequest { asset: asset.clone(), ids: ids.clone() };
                let expected = ids.len();
                async move {
                    let mut s = c.download_chunks(req).await?.into_inner();
                    let mut out = Vec::with_capacity(expected);
                    while let Some(m) = s.message().await? {
                        out.push(m);
                    }
                    Ok(out)
                }
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::DataLoss | tonic::Code::NotFound => {
                    self.corrupt(format!("file {:?}: {}", entry.path, status.message()))
                }
                _ => ClientError::Rpc { call: "DownloadChunks", status },
            })?;
        if frames.len() != refs.len() {
            return Err(ClientError::Protocol(format!("asked for {} chunks, got {}", refs.len(), frames.len())));
        }
        let cipher = self.cipher.clone();
        let snapshot = self.signed.info.id.clone();
        let path = entry.path.clone();
        tokio::task::spawn_blocking(move || {
            refs.iter()
                .zip(frames)
                .map(|(r, f)| {
                    let corrupt = |detail: String| ClientError::Corrupt { snapshot: snapshot.clone(), detail };
                    if f.id != r.0.0 {
                        return Err(ClientError::Protocol(format!("chunk {} arrived out of order", r.0)));
                    }
                    let plain = cipher.open(&r.0, &f.data).map_err(|e| corrupt(format!("file {path:?}: {e}")))?;
                    if plain.len() != r.1 as usize {
                        return Err(corrupt(format!(
                            "file {path:?}: chunk {} has length {}, manifest says {}",
                            r.0,
                            plain.len(),
                            r.1
                        )));
                    }
                    Ok(plain)
                })
                .collect()
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("decrypt worker: {e}")))?
    }

    pub fn finish(&self) {
        self.progress.finish();
    }
}

/// Splits a file's chunk list into download batches of about `bytes` plaintext each.
fn batch_refs(refs: &[ChunkRef], bytes: usize) -> Vec<Vec<ChunkRef>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0usize;
    for r in refs {
        if !cur.is_empty() && (size + r.1 as usize > bytes || cur.len() >= 256) {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += r.1 as usize;
        cur.push(*r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ChunkId;

    #[test]
    fn batches_cover_all_refs_in_order() {
        let refs: Vec<ChunkRef> = (0..100u8).map(|i| ChunkRef(ChunkId([i; 32]), 1000)).collect();
        let b = batch_refs(&refs, 10_000);
        assert_eq!(b.len(), 10);
        assert_eq!(b.concat(), refs);
        assert!(batch_refs(&[], 10).is_empty());
        // A chunk larger than the batch size still goes out, alone.
        let big = vec![ChunkRef(ChunkId([1; 32]), 50_000), ChunkRef(ChunkId([2; 32]), 10)];
        assert_eq!(batch_refs(&big, 1000).len(), 2);
    }
}
