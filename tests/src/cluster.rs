//! The three-node RabbitMQ cluster of `scripts/cluster` (rc1, rc2, rc3 on
//! 127.0.0.1:5701..5703, beside the default broker) for tests that need
//! one: [`ensure_up`] starts it, or finds it up, once per test process;
//! [`kill`] crashes a node (kill -9 of its VM) and [`start`] brings it back.
//!
//! The calls block (the script boots Erlang VMs): from an async test, call
//! them before the work starts or through `spawn_blocking`. The script
//! serializes itself across processes; a test that kills nodes shares the
//! cluster with every other cluster test running at the same time, so such
//! a test should use queues of its own and expect the others to see the
//! node go.
//!
//! Tests in one test binary run side by side: a test that kills nodes
//! holds [`exclusive`] for its whole run, and a [`Restore`] that starts
//! whatever it killed again when dropped (also when the test fails).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// What this process knows: the URLs once the cluster was seen up, and the
/// nodes it killed since (an [`ensure_up`] then starts them again).
struct Known {
    urls: Option<Vec<String>>,
    killed: BTreeSet<u8>,
}

static KNOWN: Mutex<Known> = Mutex::new(Known {
    urls: None,
    killed: BTreeSet::new(),
});

/// What [`ensure_up`] healed, for a test to report ([`take_healed`]).
static HEALED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The nodes whose dead-letter supervisor [`ensure_up`] restarted since
/// the last call.
pub fn take_healed() -> Vec<String> {
    std::mem::take(&mut *HEALED.lock().unwrap_or_else(|e| e.into_inner()))
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster")
}

/// Runs `scripts/cluster ARGS`: its standard output, or a panic with what
/// it said.
fn run(args: &[&str]) -> String {
    let out = Command::new(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/cluster {}: {e}", args.join(" ")));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scripts/cluster {} failed ({}):\n{stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The node number of "rc2", "rc2@localhost" or "2".
fn number(node: &str) -> u8 {
    let n = node.trim_start_matches("rc").trim_end_matches("@localhost");
    match n.parse() {
        Ok(n @ 1..=3) => n,
        _ => panic!("no cluster node {node:?} (rc1, rc2, rc3 or 1, 2, 3)"),
    }
}

/// The AMQP URL of one node (`/` vhost, guest from loopback).
pub fn url(node: &str) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        5700 + u16::from(number(node))
    )
}

/// `rabbitmqctl -n rcN@localhost ARGS` with the cluster's cookie and
/// environment file (as `scripts/cluster` runs it): its standard output.
pub fn rabbitmqctl(node: &str, args: &[&str]) -> Result<String, String> {
    let n = number(node);
    let dir = std::env::var("STAMPEDE_CLUSTER_DIR")
        .unwrap_or_else(|_| "/var/tmp/stampede-cluster".to_string());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if root {
        Command::new("env")
    } else {
        let mut c = Command::new("sudo");
        c.arg("env");
        c
    };
    let out = cmd
        .arg(format!("HOME={dir}"))
        .arg(format!(
            "RABBITMQ_CONF_ENV_FILE={dir}/rc{n}/rabbitmq-env.conf"
        ))
        .arg("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .args(["-q", "-n", &format!("rc{n}@localhost")])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Nodes whose quorum queues' dead-letter supervisor
/// (`rabbit_fifo_dlx_sup`) is gone, each restarted here. RabbitMQ 3.10.8
/// loses it on a node booted while its queues' leaders move (the whole
/// cluster killed and started again): the supervisor reaches its restart
/// intensity and stops, and from then on every quorum queue with
/// at-least-once dead-lettering (stampede's delay tiers) whose leader is on
/// that node crashes on election ("noproc"), so declaring one through the
/// node fails with INTERNAL_ERROR.
pub fn heal_dead_letter_supervisors() -> Vec<String> {
    let mut healed = Vec::new();
    for n in ["rc1", "rc2", "rc3"] {
        let Ok(out) = rabbitmqctl(n, &["eval", "whereis(rabbit_fifo_dlx_sup)."]) else {
            continue;
        };
        if out.trim() == "undefined" {
            let r = rabbitmqctl(
                n,
                &[
                    "eval",
                    "supervisor:restart_child(rabbit_sup, rabbit_fifo_dlx_sup).",
                ],
            );
            healed.push(format!("{n}: {}", r.unwrap_or_else(|e| e).trim()));
        }
    }
    healed
}

/// Starts the cluster unless this process already saw it up (and killed no
/// node since); the three nodes' AMQP URLs, rc1 first. After a restart of
/// killed nodes, a dead-letter supervisor RabbitMQ lost is restarted
/// ([`heal_dead_letter_supervisors`]; what was healed is printed).
pub fn ensure_up() -> Vec<String> {
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(urls), true) = (&known.urls, known.killed.is_empty()) {
        return urls.clone();
    }
    let out = run(&["up"]);
    let healed = heal_dead_letter_supervisors();
    if !healed.is_empty() {
        eprintln!("cluster: rabbit_fifo_dlx_sup was gone and was restarted on {healed:?}");
        HEALED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(healed);
    }
    let urls: Vec<String> = out
        .lines()
        .last()
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(urls.len(), 3, "scripts/cluster up printed {out:?}");
    known.urls = Some(urls.clone());
    known.killed.clear();
    urls
}

/// Kills one node's VM with SIGKILL, as a crash would ("rc2" or "2").
pub fn kill(node: &str) {
    let n = number(node);
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    run(&["kill", &n.to_string()]);
    known.killed.insert(n);
}

/// Starts a killed node again and waits until it runs; it rejoins the
/// cluster by itself.
pub fn start(node: &str) {
    let n = number(node);
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    run(&["start", &n.to_string()]);
    known.killed.remove(&n);
}

/// Every node's AMQP URL, comma-separated, rc1 first: what
/// `STAMPEDE_AMQP_URL` takes for a process on the cluster.
pub fn url_list() -> String {
    ensure_up().join(",")
}

/// Kills every node's VM with SIGKILL (rc1, rc2, then rc3): the whole
/// broker crashed. [`ensure_up`] (or a [`Restore`]) starts them again,
/// all at once.
pub fn kill_all() {
    for n in ["1", "2", "3"] {
        kill(n);
    }
}

/// The permit to change the cluster: a test that kills nodes holds it for
/// its whole run, so that no other test's nodes go under it. Tests in one
/// binary run side by side (an async mutex), and test processes too (an
/// exclusive lock on `/var/tmp/stampede-cluster-tests.lock`, or
/// `$STAMPEDE_CLUSTER_DIR-tests.lock`, released when the guard drops or the
/// process dies).
pub async fn exclusive() -> Exclusive {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = LOCK.lock().await;
    let dir = std::env::var("STAMPEDE_CLUSTER_DIR")
        .unwrap_or_else(|_| "/var/tmp/stampede-cluster".to_string());
    let path = format!("{dir}-tests.lock");
    let file = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
        f.lock().unwrap_or_else(|e| panic!("locking {path}: {e}"));
        f
    })
    .await
    .expect("taking the cluster's lock");
    Exclusive {
        _file: file,
        _guard: guard,
    }
}

/// What [`exclusive`] hands out: the cluster is this test's until dropped.
#[derive(Debug)]
pub struct Exclusive {
    _file: std::fs::File,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

/// Starts the nodes this process killed again when dropped (at the end of
/// a test, or as it unwinds from a failure), so that every test leaves the
/// three nodes running. Blocks while they boot.
#[derive(Debug, Default)]
pub struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let killed = !KNOWN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .killed
            .is_empty();
        if !killed {
            return;
        }
        let up = || {
            if let Err(e) = std::panic::catch_unwind(ensure_up) {
                eprintln!("restoring the cluster failed: {e:?}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(up)
            }
            _ => up(),
        }
    }
}

/// `scripts/cluster status`: each node up or down, the members and the
/// running ones.
pub fn status() -> String {
    run(&["status"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_named_either_way() {
        assert_eq!(number("rc2"), 2);
        assert_eq!(number("3"), 3);
        assert_eq!(number("rc1@localhost"), 1);
        assert_eq!(url("rc3"), "amqp://guest:guest@127.0.0.1:5703/%2f");
        assert!(std::panic::catch_unwind(|| number("rc4")).is_err());
    }
}
