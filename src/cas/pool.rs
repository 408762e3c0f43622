//! Worker threads that compress and write whole in-memory blobs into their
//! temp files, so a batch of many files uses every core. The caller hashes
//! (it needs the digest at once); workers only compress and write.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;

use super::write::compress_small;

/// Bytes of uncompressed input allowed in flight.
const MAX_IN_FLIGHT: u64 = 128 << 20;

pub(crate) struct Job {
    pub idx: usize,
    pub data: Vec<u8>,
    pub file: File,
}

/// Result for staged entry `idx`: the written file, or the error.
pub(crate) type Done = (usize, io::Result<File>);

struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 && *used + n > MAX_IN_FLIGHT {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += n;
    }

    fn release(&self, n: u64) {
        *self.used.lock().expect("budget lock") -= n;
        self.freed.notify_all();
    }
}

pub(crate) struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    budget: Arc<Budget>,
    abort: Arc<AtomicBool>,
    pending: usize,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel::<Done>();
        let rx = Arc::new(Mutex::new(rx));
        let budget = Arc::new(Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
        });
        let abort = Arc::new(AtomicBool::new(false));
        let workers = (0..threads.max(1))
            .map(|_| {
                let (rx, done_tx) = (rx.clone(), done_tx.clone());
                let (budget, abort) = (budget.clone(), abort.clone());
                std::thread::spawn(move || {
                    loop {
                        let job = rx.lock().expect("job queue lock").recv();
                        let Ok(Job {
                            idx,
                            data,
                            mut file,
                        }) = job
                        else {
                            return;
                        };
                        let res = if abort.load(Ordering::Relaxed) {
                            Err(io::Error::other("batch aborted"))
                        } else {
                            compress_small(&data).and_then(|z| file.write_all(&z))
                        };
                        budget.release(data.len() as u64);
                        drop(data);
                        let _ = done_tx.send((idx, res.map(|()| file)));
                    }
                })
            })
            .collect();
        Pool {
            jobs: Some(jobs),
            done,
            workers,
            budget,
            abort,
            pending: 0,
        }
    }

    /// Queue a job; blocks while too much input is in flight.
    pub fn submit(&mut self, job: Job) {
        self.budget.acquire(job.data.len() as u64);
        self.pending += 1;
        self.jobs
            .as_ref()
            .expect("pool open")
            .send(job)
            .expect("pool workers alive");
    }

    /// Finished jobs: all of them if `wait`, else those done so far.
    pub fn collect(&mut self, wait: bool) -> Vec<Done> {
        let mut out = Vec::new();
        while self.pending > 0 {
            let r = if wait {
                self.done.recv().ok()
            } else {
                self.done.try_recv().ok()
            };
            let Some(r) = r else { break };
            self.pending -= 1;
            out.push(r);
        }
        out
    }
}

impl Drop for Pool {
    /// Skips queued work and waits for the workers, so no temp file is
    /// written after the batch deletes it.
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
