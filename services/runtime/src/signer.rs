//! A dedicated thread pool for RSA signing, sized to the cores, so the
//! CPU-heavy step never runs on the async executor's worker threads.
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

type Job = Box<dyn FnOnce() + Send + 'static>;

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
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
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
                let _ = tx.send(f());
            }))
            .map_err(|_| Error::Queue("signing pool stopped".into()))?;
        rx.await
            .map_err(|_| Error::Queue("signing job dropped".into()))
    }
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
}
