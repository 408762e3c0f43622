//! Live task logs: the file a running task's output is appended to, the
//! progress followers wait on, and the hand-over to the store when the task
//! ends.
//!
//! What must stay true: a follower that saw `done` can find the complete log
//! in the store (the digest is committed to the database before `done` is
//! published), and a log never grows past its limit — the build is not
//! blocked, the excess is dropped and one marker line says so.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::cas::{Cas, CasError, Digest};
use crate::model::TaskId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub len: u64,
    pub done: bool,
}

pub struct LiveLog {
    pub path: PathBuf,
    progress: watch::Sender<Progress>,
}

impl LiveLog {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

/// The live logs of running tasks, by task id.
pub struct LiveLogs {
    dir: PathBuf,
    map: Mutex<HashMap<TaskId, Arc<LiveLog>>>,
    /// Makes each attempt's file name unique.
    seq: std::sync::atomic::AtomicU64,
}

impl LiveLogs {
    /// `dir` holds the files of running tasks; whatever is there from a
    /// previous run belongs to interrupted attempts and is removed.
    pub fn open(dir: PathBuf) -> std::io::Result<LiveLogs> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(LiveLogs {
            dir,
            map: Mutex::new(HashMap::new()),
            seq: Default::default(),
        })
    }

    pub fn get(&self, task: TaskId) -> Option<Arc<LiveLog>> {
        self.map.lock().expect("log map lock").get(&task).cloned()
    }

    /// Starts a fresh log for a task's attempt.
    pub fn create(self: &Arc<Self>, task: TaskId, limit: u64) -> std::io::Result<LogWriter> {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("{task}-{n}.log"));
        let file = File::create(&path)?;
        let (tx, _) = watch::channel(Progress {
            len: 0,
            done: false,
        });
        let live = Arc::new(LiveLog { path, progress: tx });
        self.map
            .lock()
            .expect("log map lock")
            .insert(task, live.clone());
        Ok(LogWriter {
            logs: self.clone(),
            task,
            file,
            live,
            len: 0,
            limit,
            dropped: 0,
        })
    }
}

pub struct LogWriter {
    logs: Arc<LiveLogs>,
    task: TaskId,
    file: File,
    live: Arc<LiveLog>,
    len: u64,
    limit: u64,
    dropped: u64,
}

impl LogWriter {
    /// Appends build output, up to the limit.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let room = self.limit.saturating_sub(self.len) as usize;
        let take = bytes.len().min(room);
        if take > 0 {
            self.file.write_all(&bytes[..take])?;
            self.len += take as u64;
            self.publish(false);
        }
        self.dropped += (bytes.len() - take) as u64;
        Ok(())
    }

    /// Appends a line from kiln itself (not counted against the limit).
    pub fn note(&mut self, line: &str) -> std::io::Result<()> {
        let text = format!("kiln: {line}\n");
        self.file.write_all(text.as_bytes())?;
        self.len += text.len() as u64;
        self.publish(false);
        Ok(())
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn publish(&self, done: bool) {
        let len = self.len;
        self.live.progress.send_replace(Progress { len, done });
    }

    /// Stores the complete log in the CAS and returns its digest. The log
    /// stays live (followers keep reading the file) until `close`.
    pub fn store(&mut self, cas: &Cas) -> Result<Digest, CasError> {
        if self.dropped > 0 {
            let limit = self.limit;
            let dropped = self.dropped;
            self.note(&format!(
                "log limit of {limit} bytes reached; {dropped} further bytes were dropped"
            ))?;
        }
        self.file.sync_data()?;
        let (digest, _) = cas.put_file(&self.live.path)?;
        Ok(digest)
    }

    /// Marks the log finished (after its digest is committed) and forgets
    /// the live file. Followers still reading hold it open.
    pub fn close(self) {
        drop(self);
    }
}

impl Drop for LogWriter {
    /// However the task ended, followers are told the log is done.
    fn drop(&mut self) {
        self.publish(true);
        let mut map = self.logs.map.lock().expect("log map lock");
        if map
            .get(&self.task)
            .is_some_and(|l| Arc::ptr_eq(l, &self.live))
        {
            map.remove(&self.task);
        }
        drop(map);
        let _ = std::fs::remove_file(&self.live.path);
    }
}

/// Sends a live log file into `tx` as it grows, until the log is done (or
/// at once, without `follow`). Returns false when the receiver left.
pub async fn follow_live(
    mut file: std::fs::File,
    mut progress: watch::Receiver<Progress>,
    follow: bool,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) -> bool {
    let mut off = 0u64;
    loop {
        let p = *progress.borrow_and_update();
        while p.len > off {
            let want = (p.len - off).min(256 * 1024) as usize;
            let mut buf = vec![0u8; want];
            let read = file
                .seek(SeekFrom::Start(off))
                .and_then(|_| file.read(&mut buf));
            match read {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    off += n as u64;
                    if tx.send(Ok(bytes::Bytes::from(buf))).await.is_err() {
                        return false;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return false;
                }
            }
        }
        if p.done || !follow {
            return true;
        }
        tokio::select! {
            r = progress.changed() => if r.is_err() { return true },
            _ = tx.closed() => return false,
        }
    }
}
