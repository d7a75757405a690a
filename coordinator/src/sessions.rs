//! Connected agent daemons: who is connected, since when, what they serve, whether they are
//! busy, and the channel that carries commands down their session stream. One session per
//! agent identity; a new session replaces the old one (its stream ends).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use coffer_proto::v1 as pb;
use tokio::sync::mpsc;

/// Commands queued per session before `dispatch` reports the agent as not keeping up.
pub const SESSION_QUEUE: usize = 16;

struct Conn {
    session: u64,
    version: String,
    assets: Vec<String>,
    since_ms: i64,
    last_seen_ms: i64,
    tx: mpsc::Sender<pb::SessionDown>,
    /// The job the agent is running (one at a time).
    running: Option<String>,
}

/// What `ListAgents` shows of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    pub name: String,
    pub version: String,
    pub connected: bool,
    pub assets: Vec<String>,
    pub since_ms: Option<i64>,
    pub last_seen_ms: i64,
    pub running: Option<String>,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<BTreeMap<String, Conn>>,
    /// Agents whose session ended: name -> (version, last seen).
    gone: Mutex<BTreeMap<String, (String, i64)>>,
    next: AtomicU64,
}

impl Sessions {
    /// Registers a session and returns its id. A previous session of the same agent is
    /// dropped (with it its sender, which ends that stream); its running job, if any, is
    /// returned so the caller can fail it.
    pub fn register(
        &self,
        agent: &str,
        version: &str,
        assets: Vec<String>,
        tx: mpsc::Sender<pb::SessionDown>,
        now_ms: i64,
    ) -> (u64, Option<String>) {
        let session = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Conn {
            session,
            version: version.to_string(),
            assets,
            since_ms: now_ms,
            last_seen_ms: now_ms,
            tx,
            running: None,
        };
        self.gone.lock().expect("sessions lock").remove(agent);
        let old = self.live.lock().expect("sessions lock").insert(agent.to_string(), conn);
        (session, old.and_then(|c| c.running))
    }

    pub fn heartbeat(&self, agent: &str, session: u64, now_ms: i64) {
        if let Some(c) = self.live.lock().expect("sessions lock").get_mut(agent).filter(|c| c.session == session) {
            c.last_seen_ms = now_ms;
        }
    }

    /// Ends session `session` of `agent` (if it is still the current one) and returns the
    /// job it was running.
    pub fn unregister(&self, agent: &str, session: u64, now_ms: i64) -> Option<String> {
        let mut live = self.live.lock().expect("sessions lock");
        if live.get(agent).is_none_or(|c| c.session != session) {
            return None;
        }
        let c = live.remove(agent)?;
        self.gone.lock().expect("sessions lock").insert(agent.to_string(), (c.version, now_ms));
        c.running
    }

    /// Sessions silent since before `cutoff_ms`: removed, with the jobs they were running.
    pub fn expire(&self, cutoff_ms: i64, now_ms: i64) -> Vec<(String, Option<String>)> {
        let mut live = self.live.lock().expect("sessions lock");
        let dead: Vec<String> =
            live.iter().filter(|(_, c)| c.last_seen_ms < cutoff_ms).map(|(n, _)| n.clone()).collect();
        let mut out = Vec::new();
        for name in dead {
            if let Some(c) = live.remove(&name) {
                self.gone.lock().expect("sessions lock").insert(name.clone(), (c.version, now_ms));
                out.push((name, c.running));
            }
        }
        out
    }

    /// The connected agent that serves `asset`, and whether it is busy.
    pub fn serving(&self, asset: &str) -> Option<(String, bool)> {
        let live = self.live.lock().expect("sessions lock");
        let mut candidates: Vec<(&String, &Conn)> =
            live.iter().filter(|(_, c)| c.assets.iter().any(|a| a == asset)).collect();
        candidates.sort_by_key(|(_, c)| c.running.is_some());
        candidates.first().map(|(n, c)| ((*n).clone(), c.running.is_some()))
    }

    /// Every asset some connected agent serves.
    pub fn served_assets(&self) -> Vec<String> {
        let live = self.live.lock().expect("sessions lock");
        let mut all: Vec<String> = live.values().flat_map(|c| c.assets.iter().cloned()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Sends a backup command to an idle agent and marks it busy with `job_id`.
    pub fn dispatch(&self, agent: &str, cmd: pb::BackupCommand) -> Result<(), String> {
        let mut live = self.live.lock().expect("sessions lock");
        let c = live.get_mut(agent).ok_or_else(|| format!("agent {agent} is not connected"))?;
        if let Some(j) = &c.running {
            return Err(format!("agent {agent} is busy with job {j}"));
        }
        let job = cmd.job_id.clone();
        c.tx.try_send(pb::SessionDown { msg: Some(pb::session_down::Msg::Backup(cmd)) })
            .map_err(|e| format!("agent {agent} session cannot take commands: {e}"))?;
        c.running = Some(job);
        Ok(())
    }

    /// The agent finished `job_id` (success or not).
    pub fn finished(&self, agent: &str, job_id: &str) {
        if let Some(c) = self.live.lock().expect("sessions lock").get_mut(agent)
            && c.running.as_deref() == Some(job_id)
        {
            c.running = None;
        }
    }

    pub fn view(&self) -> Vec<AgentView> {
        let live = self.live.lock().expect("sessions lock");
        let gone = self.gone.lock().expect("sessions lock");
        let mut out: Vec<AgentView> = live
            .iter()
            .map(|(n, c)| AgentView {
                name: n.clone(),
                version: c.version.clone(),
                connected: true,
                assets: c.assets.clone(),
                since_ms: Some(c.since_ms),
                last_seen_ms: c.last_seen_ms,
                running: c.running.clone(),
            })
            .collect();
        out.extend(gone.iter().map(|(n, (v, seen))| AgentView {
            name: n.clone(),
            version: v.clone(),
            connected: false,
            assets: Vec::new(),
            since_ms: None,
            last_seen_ms: *seen,
            running: None,
        }));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(job: &str, asset: &str) -> pb::BackupCommand {
        pb::BackupCommand { job_id: job.into(), asset: asset.into(), trigger: "manual".into() }
    }

    #[test]
    fn dispatch_busy_replace_and_expire() {
        let s = Sessions::default();
        let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
        let (a, old) = s.register("git-1", "0.1.0", vec!["git/a".into()], tx, 1000);
        assert!(old.is_none());
        assert_eq!(s.serving("git/a"), Some(("git-1".into(), false)));
        assert_eq!(s.serving("git/b"), None);
        s.dispatch("git-1", cmd("j1", "git/a")).unwrap();
        assert!(rx.try_recv().is_ok());
        assert!(s.dispatch("git-1", cmd("j2", "git/a")).unwrap_err().contains("busy with job j1"));
        assert_eq!(s.serving("git/a"), Some(("git-1".into(), true)));
        s.finished("git-1", "j1");
        assert_eq!(s.serving("git/a"), Some(("git-1".into(), false)));
        s.dispatch("git-1", cmd("j3", "git/a")).unwrap();

        // A new session replaces the old one and hands back its running job.
        let (tx2, _rx2) = mpsc::channel(SESSION_QUEUE);
        let (b, old) = s.register("git-1", "0.1.1", vec!["git/a".into()], tx2, 2000);
        assert_eq!(old.as_deref(), Some("j3"));
        assert!(rx.try_recv().is_ok(), "j3 was queued on the old stream");
        assert_eq!(rx.try_recv().unwrap_err(), mpsc::error::TryRecvError::Disconnected, "the old stream ended");
        assert_eq!(s.unregister("git-1", a, 2500), None, "a stale session cannot remove the new one");
        s.heartbeat("git-1", b, 3000);
        assert!(s.expire(2999, 4000).is_empty());
        assert_eq!(s.expire(3001, 4000), vec![("git-1".to_string(), None)]);
        let v = s.view();
        assert_eq!(v.len(), 1);
        assert!(!v[0].connected);
        assert_eq!((v[0].version.as_str(), v[0].last_seen_ms), ("0.1.1", 4000));
        assert!(s.dispatch("git-1", cmd("j4", "git/a")).unwrap_err().contains("not connected"));
    }
}
