//! Retry policy for calls to the coordinator: exponential backoff with jitter, only for
//! errors that can succeed on a second try.

use std::future::Future;
use std::time::Duration;

use tonic::Code;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, initial: Duration::from_millis(200), max: Duration::from_secs(10) }
    }
}

/// Transport failures and deadline errors are worth retrying; everything the coordinator
/// decided (permission, invalid input, data loss, a full disk) is not.
pub fn is_retryable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Aborted | Code::DeadlineExceeded)
        || (status.code() == Code::Unknown && status.message().contains("transport"))
}

impl RetryPolicy {
    /// Delay before retry number `n` (1-based), with up to 50% jitter.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self.initial.saturating_mul(1 << n.saturating_sub(1).min(16)).min(self.max);
        let mut r = [0u8; 2];
        let _ = getrandom::getrandom(&mut r);
        let jitter = u16::from_le_bytes(r) as f64 / u16::MAX as f64 * 0.5;
        base.mul_f64(1.0 - jitter / 2.0)
    }

    pub async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match call().await {
                Err(s) if is_retryable(&s) && n < self.attempts => {
                    let d = self.delay(n);
                    tracing::warn!(
                        call = what,
                        attempt = n,
                        delay_ms = d.as_millis() as u64,
                        "retrying: {}",
                        s.message()
                    );
                    tokio::time::sleep(d).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_only_transient_errors() {
        let p = RetryPolicy { attempts: 3, initial: Duration::from_millis(1), max: Duration::from_millis(2) };
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = p
            .run("x", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(tonic::Status::unavailable("down"))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = p
            .run("x", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(tonic::Status::permission_denied("no"))
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let r = p
            .run("x", || async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 { Err(tonic::Status::unavailable("blip")) } else { Ok(7) }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy { attempts: 10, initial: Duration::from_millis(100), max: Duration::from_secs(1) };
        assert!(p.delay(1) <= Duration::from_millis(100));
        assert!(p.delay(1) >= Duration::from_millis(75));
        assert!(p.delay(9) <= Duration::from_secs(1));
    }
}
