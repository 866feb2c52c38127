//! Private Redis and PostgreSQL servers for tests that stop them: the
//! shared servers on this machine serve other tests running at the same
//! time, so a test that takes a backend away starts one of its own, on a
//! free port of 127.0.0.1, and stops and restarts it on the same port.
//!
//! Both run as child processes of the test. [`PrivateRedis`] is
//! `redis-server` without persistence (stopping it loses its keys, as a
//! Redis restarted without a dump does). [`PrivatePostgres`] is the
//! PostgreSQL 15 server of `/usr/lib/postgresql/15/bin`, run as the
//! `postgres` OS user (initdb and postgres refuse to run as root, and the
//! tests run as root) on a data directory under `/var/tmp` copied from a
//! template made by initdb once per machine; fsync off (commits are
//! still written to the OS before they are acknowledged), trust
//! authentication on 127.0.0.1. Dropping either kills its process and
//! removes its directory, also when the test panicked.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A fresh name for a directory of this process.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs `cmd` to its end; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Sends `signal` (`TERM`, `INT`, `QUIT`, `KILL`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` to exit, up to `limit`; kills it with -9 after that.
fn reap(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `ready` every 50 ms until it holds; panics after `limit` with `what`.
fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` of the test's own.
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            child: None,
        };
        r.restart();
        r
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it answers `PING` with `+PONG` within a second.
    pub fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills it (`SIGKILL`: its keys are lost, nothing is saved) and waits
    /// for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty) and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting redis-server: {e}"));
        self.child = Some(child);
        let port = self.port;
        wait_until(
            &format!("redis-server on port {port}"),
            Duration::from_secs(20),
            || self.answers(),
        );
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The PostgreSQL 15 binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How a [`PrivatePostgres`] is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgStop {
    /// `SIGQUIT` to the postmaster (`pg_ctl stop -m immediate`): every
    /// backend quits at once, no checkpoint, recovery at the next start:
    /// as a crash.
    Immediate,
    /// `SIGINT` (`pg_ctl stop -m fast`): sessions are ended, a checkpoint
    /// is written.
    Fast,
}

/// Settings of a [`PrivatePostgres`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections` (the tests connect as the superuser
    /// `postgres`, so 0 makes every slot one anybody can take).
    pub superuser_reserved_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 100,
            superuser_reserved_connections: 3,
        }
    }
}

/// A PostgreSQL server of the test's own; see the module's documentation.
pub struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    opts: PgOptions,
    child: Option<Child>,
}

/// How long the template's initdb took, when this process made it.
static INITDB: Mutex<Option<Duration>> = Mutex::new(None);

/// `setpriv` to run a command as the `postgres` OS user.
fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
        program,
    ]);
    c
}

/// The template data directory, made by initdb the first time on this
/// machine (into a temporary name, renamed when complete), owned by
/// `postgres`. Returns it and how long initdb took when this call ran it.
fn template() -> (PathBuf, Option<Duration>) {
    let dir = PathBuf::from("/var/tmp/stampede-pg15-template");
    let mut made = INITDB.lock().unwrap_or_else(|e| e.into_inner());
    if dir.join("PG_VERSION").exists() {
        return (dir, *made);
    }
    let tmp = PathBuf::from(format!("/var/tmp/{}", unique("stampede-pg15-initdb")));
    std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    run(Command::new("chown").arg("postgres:postgres").arg(&tmp));
    let start = Instant::now();
    run(as_postgres(&format!("{PG_BIN}/initdb")).args([
        "-D",
        &tmp.display().to_string(),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]));
    let took = start.elapsed();
    *made = Some(took);
    // Another test process may have made it meanwhile: then ours goes.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    (dir, Some(took))
}

impl PrivatePostgres {
    /// Starts one with `opts` on a free port and waits until it accepts
    /// connections.
    pub fn start(opts: PgOptions) -> Self {
        let (template, _) = template();
        let dir = PathBuf::from(format!("/var/tmp/{}", unique("stampede-pg")));
        run(Command::new("cp").arg("-a").arg(&template).arg(&dir));
        let mut pg = Self {
            port: free_port(),
            dir,
            opts,
            child: None,
        };
        pg.restart();
        pg
    }

    /// How long initdb took for the template, when this process ran it
    /// (`None`: the template was there already).
    pub fn initdb_time() -> Option<Duration> {
        *INITDB.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it accepts connections (`pg_isready`).
    pub fn answers(&self) -> bool {
        Command::new(format!("{PG_BIN}/pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", "1"])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `sql` with psql on database `postgres`; its output (unaligned,
    /// tuples only).
    pub fn psql(&self, sql: &str) -> String {
        run(Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c", sql]))
    }

    /// Stops it as `how` says and waits for it to exit.
    pub fn stop(&mut self, how: PgStop) {
        if let Some(mut c) = self.child.take() {
            signal(
                c.id(),
                match how {
                    PgStop::Immediate => "QUIT",
                    PgStop::Fast => "INT",
                },
            );
            reap(&mut c, Duration::from_secs(30));
        }
    }

    /// Starts it (again) on the same port and data directory and waits
    /// until it accepts connections (after crash recovery, when it was
    /// stopped immediately).
    pub fn restart(&mut self) {
        self.stop(PgStop::Fast);
        let log = std::fs::File::create(self.dir.with_extension("log"))
            .unwrap_or_else(|e| panic!("the server's log: {e}"));
        let set = |k: &str, v: &str| ["-c".to_string(), format!("{k}={v}")];
        let mut args = vec!["-D".to_string(), self.dir.display().to_string()];
        for (k, v) in [
            ("port", self.port.to_string()),
            ("listen_addresses", "127.0.0.1".into()),
            ("unix_socket_directories", self.dir.display().to_string()),
            ("max_connections", self.opts.max_connections.to_string()),
            (
                "superuser_reserved_connections",
                self.opts.superuser_reserved_connections.to_string(),
            ),
            // fsync off: a process crash (an immediate stop) loses
            // nothing written to the OS. synchronous_commit stays on: off, a
            // commit acknowledged in the last 200 ms would be lost by the
            // crash, which no real server configured for durability does.
            ("fsync", "off".into()),
            ("full_page_writes", "off".into()),
            ("shared_buffers", "32MB".into()),
            ("logging_collector", "off".into()),
        ] {
            args.extend(set(k, &v));
        }
        let child = as_postgres(&format!("{PG_BIN}/postgres"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("log: {e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting postgres: {e}"));
        self.child = Some(child);
        let port = self.port;
        let start = Instant::now();
        while !self.answers() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    panic!("postgres exited ({status}):\n{}", self.log());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "postgres on port {port} not ready after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop(PgStop::Immediate);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// Settings of a [`PrivatePgBouncer`].
#[derive(Debug, Clone)]
pub struct PgBouncerOptions {
    /// `pool_mode`: `transaction` (a server connection is a client's for
    /// one transaction), `session` or `statement`.
    pub pool_mode: &'static str,
    /// `default_pool_size`: server connections per (database, user).
    pub default_pool_size: u32,
    /// `max_client_conn`.
    pub max_client_conn: u32,
    /// `max_prepared_statements` (PgBouncer 1.21 and later; `None` leaves
    /// it out of the configuration, which older versions refuse).
    pub max_prepared_statements: Option<u32>,
}

impl Default for PgBouncerOptions {
    fn default() -> Self {
        Self {
            pool_mode: "transaction",
            default_pool_size: 5,
            max_client_conn: 2000,
            max_prepared_statements: None,
        }
    }
}

/// A `pgbouncer` of the test's own in front of a PostgreSQL server on
/// 127.0.0.1 (a [`PrivatePostgres`] or the shared one): every database
/// name is passed through (`* =`), `auth_type = trust` for the user
/// `postgres`, who is also its admin (`SHOW POOLS` on the database
/// `pgbouncer`). Run as the `postgres` OS user (pgbouncer refuses root),
/// on a free port, its configuration and log in a directory under
/// `/var/tmp`; dropping it kills it and removes the directory.
pub struct PrivatePgBouncer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivatePgBouncer {
    /// `pgbouncer --version`'s first line (`PgBouncer 1.18.0`).
    pub fn version() -> String {
        run(Command::new("pgbouncer").arg("--version"))
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Starts one in front of the server on 127.0.0.1:`upstream` and waits
    /// until it accepts connections.
    pub fn start(upstream: u16, opts: PgBouncerOptions) -> Self {
        let dir = PathBuf::from(format!("/var/tmp/{}", unique("stampede-pgbouncer")));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let port = free_port();
        let mut ini = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={upstream}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             admin_users = postgres\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool}\n\
             max_client_conn = {clients}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {dir}/pgbouncer.log\n",
            dir = dir.display(),
            mode = opts.pool_mode,
            pool = opts.default_pool_size,
            clients = opts.max_client_conn,
        );
        if let Some(n) = opts.max_prepared_statements {
            ini.push_str(&format!("max_prepared_statements = {n}\n"));
        }
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap_or_else(|e| panic!("ini: {e}"));
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n")
            .unwrap_or_else(|e| panic!("userlist: {e}"));
        run(Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&dir));
        let child = as_postgres("pgbouncer")
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting pgbouncer: {e}"));
        let mut b = Self {
            port,
            dir,
            child: Some(child),
        };
        let start = Instant::now();
        while !b.answers() {
            if let Some(c) = b.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    b.child = None;
                    panic!("pgbouncer exited ({status}):\n{}", b.log());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "pgbouncer on port {port} not ready after 20 s:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Whether it accepts connections (`pg_isready` through it).
    pub fn answers(&self) -> bool {
        Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", "pgbouncer", "-c", "SHOW VERSION"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `command` (`SHOW POOLS`, `SHOW STATS`…) on its admin console;
    /// its output (unaligned, `|` between columns, with the header).
    pub fn admin(&self, command: &str) -> String {
        run(Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-q", "-A", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", "pgbouncer", "-c", command]))
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePgBouncer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A small filesystem of the test's own, mounted under `/var/tmp` (tmpfs
/// of the given size; the tests run as root), to fill up: [`SmallFs::fill`]
/// writes a filler file until the filesystem refuses (ENOSPC),
/// [`SmallFs::free`] removes it. Dropped, it is unmounted (lazily, should a
/// process still hold a file in it) and its mount point removed, also when
/// the test panicked.
pub struct SmallFs {
    dir: PathBuf,
    mounted: bool,
}

impl SmallFs {
    /// Mounts a tmpfs of `megabytes` on a fresh directory.
    pub fn mount(megabytes: u32) -> Self {
        let dir = PathBuf::from(format!("/var/tmp/{}", unique("stampede-smallfs")));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut fs = Self {
            dir,
            mounted: false,
        };
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&fs.dir));
        fs.mounted = true;
        fs
    }

    /// Its mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Appends to the filler file until a write fails with ENOSPC (1 MiB
    /// writes, then 4 KiB ones); the bytes it added.
    pub fn fill(&self) -> u64 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap_or_else(|e| panic!("the filler: {e}"));
        let mut added = 0u64;
        for chunk in [1 << 20, 4096] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => added += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => panic!("writing the filler: {e}"),
                }
            }
        }
        added
    }

    /// Removes the filler file.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }

    /// Bytes available to a writer now (`df`).
    pub fn available(&self) -> u64 {
        run(Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir))
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
