//! The three-node RabbitMQ cluster of `scripts/cluster`, through
//! `stampede_tests::cluster`: stampede's quorum queues on it keep taking and
//! giving messages with one node killed, and the node comes back into the
//! cluster when started again.
use std::time::Duration;

use stampede_backends::queue::amqp::AmqpQueue;
use stampede_backends::queue::{OutMessage, Queue, QueueName};
use stampede_tests::cluster;

fn message(i: u8) -> OutMessage {
    OutMessage {
        kind: "stampede.test.v1.Probe",
        payload: vec![i],
        route: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_on_the_cluster_work_with_a_node_killed() {
    let urls = tokio::task::spawn_blocking(cluster::ensure_up)
        .await
        .unwrap();
    assert_eq!(urls[0], cluster::url("rc1"));
    assert_eq!(urls.len(), 3);
    let ns = format!(
        "stampede_cl{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // Through rc1: its queues' leaders are there (client-local), rc2 and
    // rc3 hold the other replicas.
    let q = AmqpQueue::connect(&urls[0], &ns, "stampede-test")
        .await
        .unwrap();
    q.publish(QueueName::Fanout, message(1)).await.unwrap();
    tokio::task::spawn_blocking(|| cluster::kill("rc2"))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(cluster::status).await.unwrap();
    assert!(status.contains("rc2@localhost down"), "{status}");
    // Two of three: still a majority, publishes are confirmed.
    q.publish(QueueName::Fanout, message(2)).await.unwrap();
    let mut c = q.consume(QueueName::Fanout, 10).await.unwrap();
    for want in [1, 2] {
        let m = tokio::time::timeout(Duration::from_secs(30), c.next())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(m.payload[..], [want]);
        m.acker.ack().await.unwrap();
    }
    drop(c);
    tokio::task::spawn_blocking(|| cluster::start("2"))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(cluster::status).await.unwrap();
    assert!(
        status.contains("running: rc1@localhost rc2@localhost rc3@localhost"),
        "{status}"
    );
    // ensure_up after a kill asks the script again, which finds all up.
    let again = tokio::task::spawn_blocking(cluster::ensure_up)
        .await
        .unwrap();
    assert_eq!(again, urls);
    q.delete_all().await.unwrap();
}
