//! Progress of long work: a live bar on a terminal, a periodic log line otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    done: Arc<AtomicU64>,
    stop: CancellationToken,
    started: Instant,
}

impl Progress {
    /// `total` bytes if known. Draws on stderr when it is a terminal and `quiet` is false.
    pub fn start(what: &'static str, total: Option<u64>, quiet: bool) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(t) => ProgressBar::new(t).with_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                        .expect("static template")
                        .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}").expect("static template"),
                ),
            };
            bar.set_message(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        if bar.is_none() && !quiet {
            // The logger holds only a weak reference: it ends when the last Progress is dropped.
            let (done, stop) = (Arc::downgrade(&done), stop.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {
                            let Some(done) = done.upgrade() else { break };
                            let n = done.load(Ordering::Relaxed);
                            let rate = n as f64 / start.elapsed().as_secs_f64() / 1e6;
                            tracing::info!(bytes = n, mb_per_s = format!("{rate:.1}"), "{what} in progress");
                        }
                    }
                }
            });
        }
        Progress { bar, done, stop, started: Instant::now() }
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(&self) {
        self.stop.cancel();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
