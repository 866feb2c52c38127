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

/// Starts the cluster unless this process already saw it up (and killed no
/// node since); the three nodes' AMQP URLs, rc1 first.
pub fn ensure_up() -> Vec<String> {
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(urls), true) = (&known.urls, known.killed.is_empty()) {
        return urls.clone();
    }
    let out = run(&["up"]);
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
