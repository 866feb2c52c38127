//! SQLite for the embedded backends: one connection on one dedicated thread
//! per database file, WAL journal with `synchronous = FULL`, and group
//! commit: the thread runs every job waiting for it in one transaction (each
//! job in its own savepoint, so one failing job undoes only itself) and
//! answers them all after one commit. A caller is answered only once its
//! writes are durable, and a burst of writers costs one fsync, not one each.
//!
//! A job may be *relaxed* ([`Db::call_relaxed`]): its transaction commits to
//! the WAL without an fsync of its own (it reaches the disk with the next
//! durable commit or checkpoint). A killed process loses nothing (the write
//! is in the OS's page cache); only an OS crash or power cut can roll back
//! such a write. Used for writes whose loss only repeats work, never loses
//! it: queue acknowledgements and delivery success records (the queue's
//! message stays, so its delivery is retried), like RabbitMQ's acks.
//!
//! The data directory is locked ([`DataDirLock`]) before any file in it is
//! opened: a second process on the same directory fails at start instead of
//! corrupting it.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::Connection;

use crate::{Error, Result};

/// Most jobs one transaction holds.
const MAX_BATCH: usize = 512;
/// How long relaxed writes in a busy stream wait to share a commit. Their
/// callers hold a prefetched message each, so a few milliseconds cost no
/// throughput, and at 3,000 deliveries/s 4 ms writes a fifth fewer WAL pages
/// than 1 ms.
const RELAXED_LINGER: std::time::Duration = std::time::Duration::from_millis(4);

type Reply = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;
type Run = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

struct Job {
    /// Whether the caller must be answered only after an fsync.
    durable: bool,
    run: Run,
}

/// An exclusive lock on the data directory, held while the process runs
/// (released by the OS when the process dies, even by kill -9).
#[derive(Debug, Clone)]
pub struct DataDirLock {
    _file: Arc<File>,
    dir: PathBuf,
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it; fails with a clear error when
    /// another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let config = |reason: String| Error::Config {
            var: "STAMPEDE_DATA_DIR",
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| config(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("stampede.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| config(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(config(format!(
                    "{} is in use by another stampede process (lock {}); stop it or choose another data directory",
                    dir.display(),
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(config(format!("cannot lock {}: {e}", path.display())))
            }
        }
        Ok(Self {
            _file: Arc::new(file),
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How long a failed commit makes the database not ready.
const FAILING_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A database file served by its own thread.
#[derive(Clone)]
pub(crate) struct Db {
    pending: Arc<Pending>,
    _closer: Arc<Closer>,
}

/// The jobs waiting for the database thread.
///
/// A relaxed job does not wake the thread while it lingers for company (see
/// `serve`): in a stream of acknowledgements and delivery records the thread
/// wakes once a millisecond, not once a job. A durable job, a full batch, or
/// any job while the thread sleeps with nothing to do wakes it at once.
#[derive(Default)]
struct Pending {
    state: Mutex<PendingState>,
    wake: Condvar,
    /// Why the last commit failed (a full disk) and when, until one succeeds.
    failing: Mutex<Option<(std::time::Instant, String)>>,
}

#[derive(Default)]
struct PendingState {
    jobs: Vec<Job>,
    /// A durable job is among `jobs`.
    durable: bool,
    /// Every handle is gone: run what is queued, then end.
    closed: bool,
    waiting: Waiting,
}

/// What the database thread is doing when a job arrives.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Working: it looks at the jobs when it is done.
    #[default]
    No,
    /// Asleep with nothing to do.
    Idle,
    /// Lingering, until a deadline, for company for relaxed jobs.
    Linger,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, PendingState> {
        // The state is plain data; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job; gives it back if the thread has ended.
    fn push(&self, job: Job) -> std::result::Result<(), Job> {
        let mut st = self.lock();
        if st.closed {
            return Err(job);
        }
        st.durable |= job.durable;
        st.jobs.push(job);
        let wake = match st.waiting {
            Waiting::No => false,
            Waiting::Idle => true,
            Waiting::Linger => st.durable || st.jobs.len() >= MAX_BATCH,
        };
        if wake {
            st.waiting = Waiting::No;
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// Dropped with the last handle: lets the thread finish the writes queued
/// to it (an acknowledgement is queued, not awaited) before the data
/// directory's lock is released, so a process that opens the directory next
/// finds them done.
struct Closer {
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    pending: Arc<Pending>,
    _lock: DataDirLock,
}

impl Drop for Closer {
    fn drop(&mut self) {
        // Every `Db` is gone, so no job can be queued any more: the thread
        // ends once it has run what is queued.
        self.pending.close();
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Code that brings a file's schema to a version where SQL alone cannot
/// (see [`Db::open_repairing`]).
pub(crate) type Repair = fn(&Connection) -> rusqlite::Result<()>;

/// The functions the schema's triggers call (FEP-8fcf's follower digests,
/// `migrations/embedded/0007_follower_digests.sql`), registered on every
/// connection before anything runs on it.
fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    use stampede_core::followers_sync::{authority_of, Digest};
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("stampede_authority", 1, flags, |ctx| {
        let id: Option<String> = ctx.get(0)?;
        Ok(id.as_deref().and_then(authority_of).map(str::to_string))
    })?;
    conn.create_scalar_function("stampede_digest_toggle", 2, flags, |ctx| {
        let stored: Vec<u8> = ctx.get(0)?;
        let id: String = ctx.get(1)?;
        let mut d = Digest::from_bytes(&stored).unwrap_or_default();
        d.toggle(&id);
        Ok(d.0.to_vec())
    })
}

impl Db {
    /// Opens (creating) `file` in the locked directory and applies `schema`
    /// when the file's `user_version` is below `version`.
    pub(crate) fn open(lock: &DataDirLock, file: &str, schema: &[(i32, &str)]) -> Result<Self> {
        Self::open_repairing(lock, file, schema, &[])
    }

    /// [`Db::open`], running each of `repairs` in the transaction of its
    /// version, before that version's SQL.
    pub(crate) fn open_repairing(
        lock: &DataDirLock,
        file: &str,
        schema: &[(i32, &str)],
        repairs: &[(i32, Repair)],
    ) -> Result<Self> {
        let path = lock.dir().join(file);
        let conn = Connection::open(&path)?;
        // This connection is the file's only user (the data directory is
        // locked): holding SQLite's lock for good spares two fcntl locks per
        // transaction, and set before the first WAL access it keeps the WAL
        // index in this process's memory instead of a shared-memory file.
        conn.pragma_update_and_check(None, "locking_mode", "EXCLUSIVE", |r| r.get::<_, String>(0))?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        register_functions(&conn)?;
        let current: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (version, sql) in schema {
            if *version > current {
                tracing::info!(file, version, "applying embedded schema");
                // Dropped on an error, the connection rolls the
                // transaction back.
                conn.execute_batch("BEGIN")?;
                for (_, repair) in repairs.iter().filter(|(v, _)| v == version) {
                    repair(&conn)?;
                }
                conn.execute_batch(&format!("{sql}; PRAGMA user_version = {version}; COMMIT;"))?;
            }
        }
        let pending = Arc::new(Pending::default());
        let thread = {
            let pending = Arc::clone(&pending);
            std::thread::Builder::new()
                .name(format!("stampede-db-{file}"))
                .spawn(move || serve(conn, &pending))?
        };
        Ok(Self {
            _closer: Arc::new(Closer {
                thread: std::sync::Mutex::new(Some(thread)),
                pending: Arc::clone(&pending),
                _lock: lock.clone(),
            }),
            pending,
        })
    }

    /// Why writes fail (the last commit, within the last 10 s, failed: a
    /// full disk), if they do: readiness says so while reads may still
    /// answer. It lapses after 10 s without another failure, so a process
    /// taken out of rotation, and so given nothing to write, comes back.
    pub(crate) fn failing(&self) -> Option<String> {
        let f = self
            .pending
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.as_ref()
            .filter(|(at, _)| at.elapsed() < FAILING_FOR)
            .map(|(_, e)| e.clone())
    }

    /// Runs `f` on the database thread inside the current group transaction;
    /// answers after the commit is durable.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.submit(true, f).await
    }

    /// Like [`Db::call`], but answers once the commit is in the WAL, before it
    /// is fsynced (see the module's note on relaxed jobs).
    pub(crate) async fn call_relaxed<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.submit(false, f).await
    }

    /// Queues a relaxed write and returns at once, without waiting for it to
    /// run: for a write whose loss (the process killed before it runs) only
    /// repeats work, as a queue acknowledgement's does. A failure is logged.
    pub(crate) fn call_detached<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&Connection) -> Result<()> + Send + 'static,
    {
        let run: Run = Box::new(move |conn| {
            let r = f(conn);
            let ok = r.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let failed = r.err().map(|e| e.to_string()).or(commit.err());
                if let Some(error) = failed {
                    tracing::warn!(what, %error, "embedded database write failed");
                }
            });
            (ok, reply)
        });
        if self
            .pending
            .push(Job {
                durable: false,
                run,
            })
            .is_err()
        {
            tracing::warn!(what, "embedded database closed; write dropped");
        }
    }

    async fn submit<T, F>(&self, durable: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run: Run = Box::new(move |conn| {
            let r = f(conn);
            let ok = r.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let r = match commit {
                    Ok(()) => r,
                    Err(e) => Err(Error::Db(format!("commit failed: {e}"))),
                };
                let _ = tx.send(r);
            });
            (ok, reply)
        });
        self.pending
            .push(Job { durable, run })
            .map_err(|_| Error::Db("the embedded database is closed".into()))?;
        rx.await
            .map_err(|_| Error::Db("the embedded database dropped the request".into()))?
    }
}

/// Takes the next batch: waits for a job, and lets relaxed jobs in a busy
/// stream (acknowledgements, delivery records) wait a moment for company:
/// each commit writes its pages to the WAL, so a few commits of many rows
/// cost far less than many of one. Their callers are not waiting on an
/// fsync, and a durable job arriving meanwhile ends the wait. `None` once
/// every handle is gone and nothing is left.
fn next_batch(
    pending: &Pending,
    batch: &mut Vec<Job>,
    last_commit: std::time::Instant,
) -> Option<bool> {
    let mut st = pending.lock();
    while st.jobs.is_empty() {
        if st.closed {
            return None;
        }
        st.waiting = Waiting::Idle;
        st = pending.wake.wait(st).unwrap_or_else(|p| p.into_inner());
    }
    if !st.durable && last_commit.elapsed() < RELAXED_LINGER * 2 {
        let deadline = std::time::Instant::now() + RELAXED_LINGER;
        while !st.durable && st.jobs.len() < MAX_BATCH && !st.closed {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            st.waiting = Waiting::Linger;
            st = match pending.wake.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(p) => p.into_inner().0,
            };
        }
    }
    st.waiting = Waiting::No;
    if st.jobs.len() <= MAX_BATCH {
        batch.append(&mut st.jobs);
        st.durable = false;
    } else {
        batch.extend(st.jobs.drain(..MAX_BATCH));
        st.durable = st.jobs.iter().any(|j| j.durable);
    }
    Some(batch.iter().any(|j| j.durable))
}

fn serve(conn: Connection, pending: &Pending) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    let mut synchronous_full = true;
    let mut last_commit = std::time::Instant::now();
    while let Some(durable) = next_batch(pending, &mut batch, last_commit) {
        // `synchronous` cannot change inside a transaction: set it for this one.
        if durable != synchronous_full {
            let level = if durable { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", level) {
                Ok(()) => synchronous_full = durable,
                Err(e) if durable => {
                    // Never answer a durable job from a commit that skips the
                    // fsync: dropping the jobs unrun fails their callers.
                    tracing::error!(error = %e, "embedded database: cannot restore synchronous = FULL");
                    batch.clear();
                    continue;
                }
                Err(_) => {}
            }
        }
        let began = conn.execute_batch("BEGIN IMMEDIATE").is_ok();
        for job in batch.drain(..) {
            // Cached statements: parsing two more per job was a visible share
            // of this thread's time under load.
            if began {
                let _ = run_cached(&conn, "SAVEPOINT job");
            }
            let (ok, reply) = (job.run)(&conn);
            if began {
                let _ = if ok {
                    run_cached(&conn, "RELEASE job")
                } else {
                    conn.execute_batch("ROLLBACK TO job; RELEASE job")
                };
            }
            replies.push(reply);
        }
        let commit = if began {
            conn.execute_batch("COMMIT").map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(error = %e, "embedded database commit failed");
                e.to_string()
            })
        } else {
            Ok(())
        };
        if began {
            let mut failing = pending.failing.lock().unwrap_or_else(|p| p.into_inner());
            match &commit {
                Ok(()) if failing.is_some() => {
                    tracing::info!("embedded database commits again");
                    *failing = None;
                }
                Ok(()) => {}
                Err(e) => *failing = Some((std::time::Instant::now(), e.clone())),
            }
        }
        last_commit = std::time::Instant::now();
        for reply in replies.drain(..) {
            reply(commit.clone());
        }
    }
}

fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, msg) = &e {
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            {
                return Error::Conflict(msg.clone().unwrap_or_else(|| e.to_string()));
            }
        }
        Error::Db(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_fails_clearly() {
        let dir = std::env::temp_dir().join(format!("stampede-lock-{}", uuid::Uuid::new_v4()));
        let first = DataDirLock::acquire(&dir).unwrap();
        let err = DataDirLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains("STAMPEDE_DATA_DIR") && err.contains("in use"),
            "{err}"
        );
        drop(first);
        DataDirLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn relaxed_jobs_skip_the_fsync_and_durable_ones_restore_it() {
        let dir = std::env::temp_dir().join(format!("stampede-db-{}", uuid::Uuid::new_v4()));
        let lock = DataDirLock::acquire(&dir).unwrap();
        let db = Db::open(&lock, "t.db", &[(1, "CREATE TABLE t (v INTEGER)")]).unwrap();
        let level = |c: &Connection| -> Result<i64> {
            Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))?)
        };
        // 1 = NORMAL (commit to the WAL, no fsync), 2 = FULL.
        let relaxed = db
            .call_relaxed(move |c| {
                c.execute("INSERT INTO t VALUES (1)", [])?;
                level(c)
            })
            .await
            .unwrap();
        assert_eq!(relaxed, 1);
        let durable = db
            .call(move |c| {
                c.execute("INSERT INTO t VALUES (2)", [])?;
                level(c)
            })
            .await
            .unwrap();
        assert_eq!(durable, 2);
        let n: i64 = db
            .call_relaxed(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 2);
        // The WAL index lives in this process (exclusive locking mode).
        assert!(!dir.join("t.db-shm").exists());
        drop(db);
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn relaxed_writes_in_a_stream_all_land_and_queued_ones_run_before_close() {
        let dir = std::env::temp_dir().join(format!("stampede-db-{}", uuid::Uuid::new_v4()));
        let lock = DataDirLock::acquire(&dir).unwrap();
        let schema = [(1, "CREATE TABLE t (v INTEGER)")];
        let db = Db::open(&lock, "t.db", &schema).unwrap();
        // A stream of relaxed writes (the thread lingers for company between
        // commits and is not woken by each), then a durable one.
        let stream = (0..300).map(|v| {
            let db = db.clone();
            tokio::spawn(async move {
                db.call_relaxed(move |c| Ok(c.execute("INSERT INTO t VALUES (?1)", [v])?))
                    .await
            })
        });
        for r in futures::future::join_all(stream).await {
            r.unwrap().unwrap();
        }
        db.call(|c| Ok(c.execute("INSERT INTO t VALUES (-1)", [])?))
            .await
            .unwrap();
        // Detached writes queued just before the last handle goes run
        // before the directory's lock is released.
        for v in 1000..1100 {
            db.call_detached("test", move |c| {
                c.execute("INSERT INTO t VALUES (?1)", [v])?;
                Ok(())
            });
        }
        drop(db);
        drop(lock);
        let lock = DataDirLock::acquire(&dir).unwrap();
        let db = Db::open(&lock, "t.db", &schema).unwrap();
        let n: i64 = db
            .call(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 401);
        drop(db);
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_failing_job_undoes_only_itself() {
        let dir = std::env::temp_dir().join(format!("stampede-db-{}", uuid::Uuid::new_v4()));
        let lock = DataDirLock::acquire(&dir).unwrap();
        let db = Db::open(&lock, "t.db", &[(1, "CREATE TABLE t (v INTEGER UNIQUE)")]).unwrap();
        let a = db.call(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?));
        let b = db.call(|c| {
            c.execute("INSERT INTO t VALUES (2)", [])?;
            Ok(c.execute("INSERT INTO t VALUES (1)", [])?)
        });
        let (a, b) = tokio::join!(a, b);
        assert_eq!(a.unwrap(), 1);
        assert!(matches!(b, Err(Error::Conflict(_))));
        let rows: Vec<i64> = db
            .call(|c| {
                let mut s = c.prepare("SELECT v FROM t ORDER BY v")?;
                let r = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok(r)
            })
            .await
            .unwrap();
        assert_eq!(rows, [1]);
        drop(db);
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
