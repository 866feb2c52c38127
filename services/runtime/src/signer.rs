//! A dedicated thread pool for RSA signing, sized to the cores, so the
//! CPU-heavy step never runs on the async executor's worker threads.
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Hands a finished job's result to its caller (wakes the awaiting task).
type Completion = Box<dyn FnOnce() + Send + 'static>;
type Job = Box<dyn FnOnce() -> Completion + Send + 'static>;

/// Most finished jobs a signing thread holds back while more are queued.
///
/// Each answer wakes the awaiting task, and a runtime worker parked between
/// answers is woken (a futex call and a context switch that preempts a
/// signing thread) once per job. In a fanout the queue is deep: answering a
/// few at once wakes the worker once for all of them, at the cost of a few
/// signatures' latency (under a millisecond) for the first of them. An idle
/// pool answers at once.
const HOLD: usize = 4;

/// The signing pool. Cloning shares the threads.
#[derive(Clone)]
pub struct SignerPool {
    tx: mpsc::Sender<Job>,
}

impl SignerPool {
    /// Starts `threads` signing threads (at least one).
    pub fn new(threads: usize) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("stampede-sign-{i}"))
                .spawn(move || work(&rx))?;
        }
        Ok(Self { tx })
    }

    /// A pool with one thread per available core.
    pub fn per_core() -> Result<Self> {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// Runs `f` on the pool and awaits its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let r = f();
                Box::new(move || {
                    let _ = tx.send(r);
                }) as Completion
            }))
            .map_err(|_| Error::Internal("signing pool stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("signing job dropped".into()))
    }
}

/// A signing thread: runs jobs until every sender is gone, answering them
/// [`HOLD`] at a time while more are queued, at once when none are.
fn work(rx: &Mutex<mpsc::Receiver<Job>>) {
    let mut held: Vec<Completion> = Vec::with_capacity(HOLD);
    loop {
        // Never wait for the lock while holding answers: the thread that has
        // it may be waiting for a job that only those answers would bring.
        let next = match rx.try_lock() {
            Ok(queue) => queue.try_recv(),
            Err(std::sync::TryLockError::WouldBlock) => Err(mpsc::TryRecvError::Empty),
            Err(std::sync::TryLockError::Poisoned(_)) => Err(mpsc::TryRecvError::Disconnected),
        };
        let job = match next {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Empty) => {
                // Nothing queued: answer what is held, then wait.
                answer(&mut held);
                let waited = match rx.lock() {
                    Ok(queue) => queue.recv().ok(),
                    Err(_) => None,
                };
                match waited {
                    Some(job) => job,
                    None => return,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                answer(&mut held);
                return;
            }
        };
        held.push(job());
        if held.len() >= HOLD {
            answer(&mut held);
        }
    }
}

/// Hands every held result to its caller.
fn answer(held: &mut Vec<Completion>) {
    held.drain(..).for_each(|completion| completion());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_off_the_runtime() {
        let pool = SignerPool::new(2).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("stampede-sign-"));
    }

    /// Callers that each send their next job only when the last is answered
    /// (delivery tasks, one job at a time) are all answered: a thread holding
    /// answers never waits for the queue, or they would wait for each other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_held_for_company_are_never_stranded() {
        let pool = SignerPool::new(2).unwrap();
        let callers: Vec<_> = (0..3u64)
            .map(|c| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut sum = 0;
                    for i in 0..200u64 {
                        sum += pool.run(move || c * 1000 + i).await.unwrap();
                    }
                    sum
                })
            })
            .collect();
        let all = async {
            let mut sums = Vec::new();
            for c in callers {
                sums.push(c.await.unwrap());
            }
            sums
        };
        let sums = tokio::time::timeout(std::time::Duration::from_secs(10), all)
            .await
            .expect("a caller was never answered");
        assert_eq!(sums, [19_900, 219_900, 419_900]);
    }

    /// A burst deeper than the hold is answered in full, each caller with
    /// its own result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_is_answered_in_full() {
        let pool = SignerPool::new(2).unwrap();
        let jobs: Vec<_> = (0..101u64)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(move || i * 2).await.unwrap() })
            })
            .collect();
        for (i, j) in jobs.into_iter().enumerate() {
            assert_eq!(j.await.unwrap(), i as u64 * 2);
        }
    }
}
