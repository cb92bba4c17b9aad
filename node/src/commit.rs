//! Group commit: one thread applies every queued batch, then flushes once
//! for all of them, then answers each writer. Concurrent writers therefore
//! share one fsync instead of paying one each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::audit::Checkpointer;
use crate::store::{Batch, Committed, Op, Store};
use crate::{Error, Result};

struct Job {
    batch: Batch,
    durable: bool,
    reply: oneshot::Sender<Result<Committed>>,
}

/// Handle to the committer thread.
pub(crate) struct Committer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    poisoned: Arc<AtomicBool>,
}

impl Committer {
    /// Starts the thread; `max_group` batches at most share one flush
    /// (1 = one flush per batch). With `checkpoints`, every group that
    /// appended audit entries also writes a signed checkpoint of the new
    /// head before its flush (none when the log no longer reaches its last
    /// checkpoint: that one stays as the evidence).
    pub(crate) fn start(store: Arc<dyn Store>, max_group: usize, checkpoints: Option<Checkpointer>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let flag = poisoned.clone();
        let max_group = max_group.max(1);
        let thread = std::thread::Builder::new()
            .name("medmesh-committer".into())
            .spawn(move || run(&*store, &rx, max_group, &flag, checkpoints))
            .map_err(|e| Error::Storage(format!("cannot start committer: {e}")))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            poisoned,
        })
    }

    /// Applies `batch` atomically; with `durable`, answers only after a flush.
    pub(crate) async fn commit(&self, batch: Batch, durable: bool) -> Result<Committed> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let (reply, answer) = oneshot::channel();
        {
            let tx = self.tx.lock().map_err(|_| Error::CommitterStopped)?;
            let tx = tx.as_ref().ok_or(Error::CommitterStopped)?;
            tx.send(Job { batch, durable, reply })
                .map_err(|_| Error::CommitterStopped)?;
        }
        answer.await.map_err(|_| Error::CommitterStopped)?
    }

    /// Stops accepting work, lets the thread finish what is queued (with a
    /// final flush) and waits for it.
    pub(crate) fn stop(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("committer thread panicked");
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    store: &dyn Store,
    rx: &mpsc::Receiver<Job>,
    max_group: usize,
    poisoned: &AtomicBool,
    mut checkpoints: Option<Checkpointer>,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_group {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<Committed>> = if poisoned.load(Ordering::Acquire) {
            jobs.iter().map(|_| Err(Error::Poisoned)).collect()
        } else {
            let batches: Vec<&Batch> = jobs.iter().map(|j| &j.batch).collect();
            match store.commit_group(&batches) {
                Ok(outs) => outs.into_iter().map(Ok).collect(),
                // One bad batch must not fail the others: isolate it.
                Err(_) => batches.iter().map(|b| store.commit(b)).collect(),
            }
        };
        if let Some(c) = checkpoints.as_mut() {
            c.after_commit(store);
        }
        let needs_flush = jobs.iter().zip(&results).any(|(j, r)| j.durable && r.is_ok());
        if needs_flush && let Err(e) = store.flush() {
            poisoned.store(true, Ordering::Release);
            tracing::error!(cause = %e, "durable flush failed; store poisoned");
            let message = e.to_string();
            for (job, result) in jobs.iter().zip(results.iter_mut()) {
                if job.durable && result.is_ok() {
                    if let Ok(committed) = result {
                        withdraw(store, &job.batch, committed, &message);
                    }
                    *result = Err(Error::Storage(format!("flush failed: {message}")));
                }
            }
        }
        for (job, result) in jobs.into_iter().zip(results) {
            // A writer that stopped waiting is not an error here.
            let _ = job.reply.send(result);
        }
    }
    if let Err(e) = store.flush() {
        tracing::error!(cause = %e, "final flush failed");
    }
}

/// Takes a batch whose flush failed back out of the store, so that nothing
/// its writer was told failed is read, served to peers or (once a later
/// flush or sled's own background flush writes this too) found after a
/// reopen. Only batches of new items and their audit entries (every local
/// write, and ingest pages that only add items) are withdrawn: removing
/// their items restores the state before them. A batch that also dequeues,
/// re-indexes or removes items is left as it is, since removal would not
/// undo the rest (a peer re-sends what it was not acknowledged for). The
/// audit log keeps the batch's entries and gains one per entry saying it was
/// withdrawn.
fn withdraw(store: &dyn Store, batch: &Batch, committed: &Committed, cause: &str) {
    let local_write = batch
        .ops
        .iter()
        .all(|op| matches!(op, Op::PutItem { .. } | Op::Audit(_)));
    if !local_write || committed.items.is_empty() {
        return;
    }
    let mut undo = Batch::new();
    for (id, _) in &committed.items {
        undo.push(Op::RemoveItem(*id));
    }
    for op in &batch.ops {
        if let Op::Audit(record) = op {
            let mut record = record.clone();
            record.outcome = format!("withdrawn: not durable (flush failed: {cause})");
            undo.push(Op::Audit(record));
        }
    }
    if let Err(e) = store.commit(&undo) {
        tracing::error!(cause = %e, "withdrawing a write whose flush failed failed too");
    }
}
