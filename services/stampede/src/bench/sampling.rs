//! What the benches measure with: the ceilings (signing, verification) on
//! threads of their own, this process's peak RSS and CPU (per thread name),
//! percentiles, and the side runtimes that stand for the remote servers.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stampede_sink::{Sink, SinkOptions};

use super::ingest::inbound_body;

// ---------------------------------------------------------------- ceilings

/// RSA-2048 PKCS#1 v1.5 SHA-256 signatures per second with aws-lc-rs (the
/// library delivery signs with): on one core, and on all cores at once.
pub(super) fn signing_ceiling(for_each: Duration) -> anyhow::Result<(f64, f64, usize)> {
    let key = stampede_core::keys::generate_rsa_2048()?;
    let pair = Arc::new(stampede_core::keys::load_private_key(
        &key.private_pkcs8_der,
    )?);
    let msg = b"(request-target): post /inbox\nhost: remote.example\ndate: Fri, 27 Nov 2026 12:00:00 GMT\ndigest: SHA-256=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    let sign = move || stampede_core::signature::rsa_sha256_sign(&pair, msg).is_ok();
    let run = |threads: usize| rate_on_threads(threads, for_each, sign.clone());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok((run(1)?, run(cores)?, cores))
}

/// Successful calls of `work` per second on `threads` threads: the best of
/// three rounds of `for_each / 3`. A shared machine's rate dips while a
/// neighbour runs; the ceiling is what the machine can do, so a dip must not
/// lower it (that would flatter every ratio measured against it).
pub(super) fn rate_on_threads(
    threads: usize,
    for_each: Duration,
    work: impl Fn() -> bool + Clone + Send + 'static,
) -> anyhow::Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        best = best.max(one_round(threads, for_each / 3, work.clone())?);
    }
    Ok(best)
}

fn one_round(
    threads: usize,
    for_each: Duration,
    work: impl Fn() -> bool + Clone + Send + 'static,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let work = work.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while started.elapsed() < for_each {
                    if work() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("a measuring thread panicked"))?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// RSA-2048 verifications per second (parse + digest + verify of a cavage
/// request, as the inbox does), on one core and on all.
pub(super) fn verify_ceiling(for_each: Duration) -> anyhow::Result<(f64, f64)> {
    use stampede_core::verify::{self, HttpRequest};
    let key = stampede_core::keys::generate_rsa_2048()?;
    let pair = stampede_core::keys::load_private_key(&key.private_pkcs8_der)?;
    let verifying = Arc::new(stampede_core::keys::VerifyingKey::from_pem(
        &key.public_pem,
    )?);
    let body = Arc::new(inbound_body(0).1);
    let digest = stampede_core::digest::digest_header(&body);
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let sig = stampede_core::signature::sign_request(
        &pair,
        "https://r0.bench.example/users/a0#main-key",
        "POST",
        "/inbox",
        stampede_core::signature::POST_HEADERS,
        |h| match h {
            "host" => Some("social.example"),
            "date" => Some(date.as_str()),
            "digest" => Some(digest.as_str()),
            _ => None,
        },
    )?;
    let headers = Arc::new(vec![
        ("host".to_string(), "social.example".to_string()),
        ("date".to_string(), date.clone()),
        ("digest".to_string(), digest.clone()),
        ("signature".to_string(), sig),
    ]);
    let check = move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let req = HttpRequest {
            method: "POST",
            scheme: "https",
            path_and_query: "/inbox",
            headers: &h,
            body: &body,
        };
        verify::parse(&req)
            .and_then(|s| {
                verify::check_coverage_and_digest(&req, &s)?;
                verify::verify_signature(&s, &verifying)
            })
            .is_ok()
    };
    let run = |threads: usize| rate_on_threads(threads, for_each, check.clone());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok((run(1)?, run(cores)?))
}

// ---------------------------------------------------------------- process facts

/// Peak resident set of this process, MiB (`VmHWM`).
pub(super) fn peak_rss_mib() -> f64 {
    peak_rss_mib_of("self")
}

/// Peak resident set of process `pid` (or `self`), MiB.
pub(super) fn peak_rss_mib_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Starts peak-RSS accounting afresh (Linux `clear_refs` 5).
pub(super) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds of this process (user + system).
pub fn process_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .map_or(0.0, |s| cpu_of_stat(&s))
}

fn cpu_of_stat(stat: &str) -> f64 {
    // Fields after the parenthesised command: state is field 3; utime 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of process `pid` (user + system; 0 when it is gone).
pub(super) fn cpu_secs_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .map_or(0.0, |s| cpu_of_stat(&s))
}

/// CPU seconds so far of every process on this machine whose command is
/// `comm` (`beam.smp`, `postgres`, `redis-server`), by pid, from /proc.
pub(super) fn comm_cpu_secs(comm: &str) -> HashMap<u32, f64> {
    let mut by_pid = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return by_pid;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        let name = stat
            .find('(')
            .zip(stat.rfind(')'))
            .map(|(a, b)| &stat[a + 1..b]);
        if name == Some(comm) {
            by_pid.insert(pid, cpu_of_stat(&stat));
        }
    }
    by_pid
}

/// CPU seconds the processes of `after` spent since `before` (a process
/// started since counts whole; one that exited meanwhile is lost).
pub(super) fn cpu_spent(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, secs)| secs - before.get(pid).copied().unwrap_or(0.0))
        .filter(|d| *d > 0.0)
        .fold(0.0, |sum, d| sum + d)
}

/// Resident set of process `pid` now, MiB (`VmRSS`; 0 when it is gone).
pub(super) fn rss_mib_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The processes listening on these TCP ports on this machine (a broker's
/// VMs, from its AMQP ports), from /proc: the listening sockets' inodes,
/// then whose descriptors they are. Those of other users need root.
pub(super) fn listening_pids(ports: &[u16]) -> Vec<u32> {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; state 0A is LISTEN.
            let port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.get(3) == Some(&"0A") && port.is_some_and(|p| ports.contains(&p)) {
                if let Some(inode) = f.get(9) {
                    inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    let mut pids = Vec::new();
    if inodes.is_empty() {
        return pids;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_str().is_some_and(|l| inodes.contains(l)))
        }) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// CPU seconds of this process's threads whose name starts with `name`.
pub(super) fn threads_cpu_secs(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim().starts_with(name))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|s| cpu_of_stat(&s))
        .sum()
}

/// Percentiles of sorted latencies, milliseconds, with what they measure.
pub(super) fn latency_json(sorted: &[f64], what: &str) -> serde_json::Value {
    json!({
        "what": what,
        "min": sorted.first().copied().unwrap_or(0.0),
        "p50": percentile(sorted, 0.5),
        "p90": percentile(sorted, 0.9),
        "p99": percentile(sorted, 0.99),
        "max": sorted.last().copied().unwrap_or(0.0),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- the remote side

/// Fake servers on runtime threads of their own (`stampede-sink`), so their
/// CPU is measured apart from stampede's.
pub(super) struct BenchSink {
    pub(super) sink: Arc<Sink>,
    rt: tokio::runtime::Runtime,
}

impl BenchSink {
    pub(super) async fn start(opts: SinkOptions) -> anyhow::Result<Self> {
        let rt = side_runtime("stampede-sink")?;
        let sink = Arc::new(rt.spawn(Sink::start(opts)).await??);
        Ok(Self { sink, rt })
    }

    /// The runtime the fake servers run on: what they send (Follows) is
    /// spawned there too, apart from stampede's runtime.
    pub(super) fn handle(&self) -> tokio::runtime::Handle {
        self.rt.handle().clone()
    }

    pub(super) fn stop(self) {
        self.sink.shutdown();
        drop(self.sink);
        self.rt.shutdown_background();
    }
}

/// A one-thread runtime named `name`, for what stands for the remote side
/// (fake servers, load generator): apart from stampede's runtime, its CPU
/// measured by thread name.
fn side_runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// Runs the load generator on a runtime thread of its own (`stampede-load`),
/// as the remote servers are apart from stampede: not on the runtime of the
/// services it drives, whose threads are sized as `stampede up`'s.
pub(super) async fn on_load_thread<T: Send + 'static>(
    load: impl std::future::Future<Output = T> + Send + 'static,
) -> anyhow::Result<T> {
    let rt = side_runtime("stampede-load")?;
    let out = rt.spawn(load).await;
    rt.shutdown_background();
    Ok(out?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_percentiles() {
        let stat = "123 (stampede sink) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert!((cpu_of_stat(stat) - 3.0).abs() < 1e-9);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(peak_rss_mib() > 0.0);
        assert!(rss_mib_of("self") > 0.0);
        assert!(cpu_secs_of(&std::process::id().to_string()) >= 0.0);
        assert_eq!(rss_mib_of("0"), 0.0);
    }

    #[test]
    fn a_listener_is_found_by_its_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listening_pids(&[port]), vec![std::process::id()]);
        drop(l);
        assert!(listening_pids(&[port]).is_empty());
    }
}
