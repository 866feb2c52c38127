//! Services as real processes: `stampede serve X` with health, readiness,
//! metrics, configuration errors and SIGTERM.
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{admin_db_url, amqp_url, free_port, redis_url, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_stampede-e2e");

#[tokio::test]
async fn a_bad_variable_stops_start_up_with_one_line_naming_it() {
    for (var, val) in [
        ("STAMPEDE_GRPC_ADDR", "nope"),
        ("STAMPEDE_PUBLIC_URL", "ftp://x"),
        ("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "perhaps"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "delivery"])
            .env_clear()
            .env(var, val)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].starts_with(&format!("error: {var}: ")), "{err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "fanout"])
        .env_clear()
        .output()
        .await
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("STAMPEDE_AMQP_URL: not set"), "{err}");
}

#[tokio::test]
async fn serve_reports_health_and_stops_on_sigterm() {
    let ns = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (admin, conn) = tokio_postgres::connect(&admin_db_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let db = format!("stampede_{ns}");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let db_url = format!("{}/{db}", admin_db_url().rsplit_once('/').unwrap().0);
    let (grpc, metrics) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["serve", "delivery"])
        .env("STAMPEDE_AMQP_URL", amqp_url())
        .env("STAMPEDE_REDIS_URL", redis_url())
        .env("STAMPEDE_DATABASE_URL", &db_url)
        .env("STAMPEDE_NAMESPACE", &ns)
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("STAMPEDE_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{metrics}");
    wait_for("readyz", Duration::from_secs(30), || async {
        matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("stampede_delivery_duration_seconds"),
        "{text}"
    );

    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    wait_for("grpc health SERVING", Duration::from_secs(10), || {
        let mut h = health.clone();
        async move {
            let r = h
                .check(HealthCheckRequest {
                    service: "stampede.delivery".into(),
                })
                .await;
            matches!(r, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
        }
    })
    .await;
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");

    let q = stampede_backends::queue::amqp::AmqpQueue::connect(&amqp_url(), &ns, "cleanup")
        .await
        .unwrap();
    q.delete_all().await.unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// CPU seconds (user and system) a process has used, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) in clock ticks (100/s).
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// A fake server out of file descriptors waits for connections to close
/// instead of retrying its accept at once (a spin on one core), and answers
/// again once they have.
#[tokio::test]
async fn a_sink_out_of_descriptors_waits_instead_of_spinning() {
    use tokio::io::AsyncBufReadExt;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" sink --servers 1 --verify-every 0 --every 3600")
        .arg(BIN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let addr = base.trim_start_matches("http://").to_string();
    // More connections than the sink has descriptors left: the rest wait
    // in the listener's backlog while its accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_secs(pid) - before;
    assert!(
        spent < 0.5,
        "the sink used {spent} s of CPU in 2 s while out of descriptors"
    );
    drop(held);
    let url = format!("{base}/users/f0");
    wait_for(
        "the sink to answer again",
        Duration::from_secs(10),
        || async {
            reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        },
    )
    .await;
    child.kill().await.unwrap();
}
