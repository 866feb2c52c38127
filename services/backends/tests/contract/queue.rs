//! The `Queue` contract, run on RabbitMQ and on the embedded queue.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use stampede_backends::clock::now_ms;
use stampede_backends::queue::{
    ready_messages, Consumer, DeadInfo, Incoming, OutMessage, Queue, QueueName,
};
use tracing::instrument::WithSubscriber;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// Instantiates every test of the suite for one implementation:
/// `queue_test_suite!(module, factory)`, with `factory` an
/// `async fn() -> Fixture<Arc<dyn Queue>>`.
macro_rules! queue_test_suite {
    ($module:ident, $factory:path) => {
        mod $module {
            queue_test_suite!(@tests $factory;
                publish_consume_ack_round_trip,
                each_queue_keeps_its_own_messages,
                requeue_gives_the_message_back_redelivered,
                a_message_held_by_a_consumer_that_died_comes_back_redelivered,
                consumers_come_and_go_without_disturbing_the_others,
                publish_batch_keeps_the_order,
                prefetch_bounds_the_unacknowledged_messages,
                ack_multiple_settles_the_consumers_earlier_messages_only,
                acks_at_once_settle_exactly_the_acknowledged_messages,
                acks_in_any_order_settle_every_message,
                a_delayed_message_waits_for_its_delay,
                a_delay_is_never_shortened,
                each_delivery_class_has_its_own_queue_and_delays,
                dead_letter_carries_the_reason_and_the_source,
                an_accepted_event_reaches_the_app_queue_only,
                ack_with_event_publishes_the_event_and_acknowledges,
                depths_count_ready_messages_and_consumers,
                messages_carry_the_publishers_trace_context,
                publishes_that_arrive_together_each_arrive_once_with_their_own_trace,
            );
        }
    };
    (@tests $factory:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::support::run($factory(), super::$test).await;
            }
        )*
    };
}

queue_test_suite!(amqp, crate::support::amqp_queue);
queue_test_suite!(amqp_sharded, crate::support::amqp_sharded_queue);
queue_test_suite!(embedded, crate::support::embedded_queue);

/// A node list: a node that does not answer is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_url_list_skips_a_node_that_does_not_answer() {
    crate::support::run(
        crate::support::amqp_queue_listed_after_a_dead_node(),
        publish_consume_ack_round_trip,
    )
    .await;
}

/// No node answering: the error names each by its place, never its URL
/// (which carries the password).
#[tokio::test]
async fn amqp_url_list_of_dead_nodes_fails_without_the_password() {
    let list = "amqp://u:hunter2@127.0.0.1:1/%2f,amqp://u:hunter2@127.0.0.1:2/%2f";
    let e = match stampede_backends::queue::amqp::AmqpQueue::connect(list, "x", "t").await {
        Ok(_) => panic!("nothing listens on ports 1 and 2"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("node 2 of 2"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

const KIND: &str = "stampede.queue.v1.DeliveryJob";
const EVENT_KIND: &str = "stampede.queue.v1.VerifiedActivity";
/// How long a message that must come may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long to watch for a message that must not come.
const QUIET: Duration = Duration::from_millis(400);

fn msg(payload: &[u8]) -> OutMessage {
    OutMessage {
        kind: KIND,
        payload: payload.to_vec(),
        route: None,
    }
}

/// The next message, which must come within [`WAIT`].
async fn next(c: &mut Box<dyn Consumer>) -> Incoming {
    match tokio::time::timeout(WAIT, c.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => panic!("the consumer failed: {e}"),
        Ok(None) => panic!("the consumer ended"),
        Err(_) => panic!("no message within {WAIT:?}"),
    }
}

/// Asserts that no message comes within `within`.
async fn nothing(c: &mut Box<dyn Consumer>, within: Duration) {
    if let Ok(m) = tokio::time::timeout(within, c.next()).await {
        let m = m.map(|m| m.map(|m| String::from_utf8_lossy(&m.payload).into_owned()));
        panic!("expected no message within {within:?}, got {m:?}");
    }
}

/// Waits until `name` holds `want` ready messages.
async fn ready_becomes(q: &dyn Queue, name: QueueName, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = ready_messages(q, name).await.unwrap();
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name:?} holds {n} ready messages, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `name` has `want` consumers.
async fn consumers_become(q: &dyn Queue, name: QueueName, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let depths = q.depths().await.unwrap();
        let n = depths.iter().find(|d| d.name == name).unwrap().consumers;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name:?} has {n} consumers, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The full name of every queue, as `depths` gives it.
async fn full_names(q: &dyn Queue) -> HashMap<QueueName, String> {
    q.depths()
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.queue))
        .collect()
}

fn text(m: &Incoming) -> &str {
    std::str::from_utf8(&m.payload).unwrap()
}

async fn publish_consume_ack_round_trip(q: Arc<dyn Queue>) {
    assert!(q.is_connected());
    // Binary payloads go through untouched.
    let payload = b"\x00\x01job\xff\xfe".to_vec();
    let before = now_ms();
    q.publish(
        QueueName::Delivery,
        OutMessage {
            kind: KIND,
            payload: payload.clone(),
            route: None,
        },
    )
    .await
    .unwrap();
    let after = now_ms();
    ready_becomes(&*q, QueueName::Delivery, 1).await;

    let mut c = q.consume(QueueName::Delivery, 10).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(m.kind.as_deref(), Some(KIND));
    assert_eq!(&m.payload[..], &payload[..]);
    assert!(!m.redelivered, "delivered for the first time");
    assert_eq!(m.dead, None);
    let ready = m
        .ready_unix_ms
        .expect("the ready time of a message published here");
    assert!(
        (before..=after).contains(&ready),
        "ready at {ready}, published between {before} and {after}"
    );
    m.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
    drop(c);

    // Acknowledged is removed: the message is not handed out again.
    let mut c = q.consume(QueueName::Delivery, 10).await.unwrap();
    nothing(&mut c, QUIET).await;
    assert_eq!(ready_messages(&*q, QueueName::Delivery).await.unwrap(), 0);
    assert!(q.is_connected());
}

async fn each_queue_keeps_its_own_messages(q: Arc<dyn Queue>) {
    for name in QueueName::ALL {
        q.publish(name, msg(name.suffix().as_bytes()))
            .await
            .unwrap();
    }
    for name in QueueName::ALL {
        ready_becomes(&*q, name, 1).await;
    }
    for name in QueueName::ALL {
        let mut c = q.consume(name, 10).await.unwrap();
        let m = next(&mut c).await;
        assert_eq!(text(&m), name.suffix(), "consumed from {name:?}");
        m.acker.ack().await.unwrap();
        nothing(&mut c, QUIET).await;
    }
}

async fn requeue_gives_the_message_back_redelivered(q: Arc<dyn Queue>) {
    q.publish(QueueName::Fanout, msg(b"again")).await.unwrap();
    let mut c = q.consume(QueueName::Fanout, 1).await.unwrap();
    let m = next(&mut c).await;
    assert!(!m.redelivered);
    m.acker.requeue().await.unwrap();

    let m = next(&mut c).await;
    assert_eq!(text(&m), "again");
    assert_eq!(m.kind.as_deref(), Some(KIND));
    assert!(m.redelivered, "a requeued message is redelivered");
    m.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
}

async fn a_message_held_by_a_consumer_that_died_comes_back_redelivered(q: Arc<dyn Queue>) {
    q.publish(QueueName::Inbound, msg(b"held")).await.unwrap();
    let mut c = q.consume(QueueName::Inbound, 1).await.unwrap();
    let m = next(&mut c).await;
    assert!(!m.redelivered);
    // The consumer goes away holding the message, never settling it.
    drop(m);
    drop(c);

    let mut c = q.consume(QueueName::Inbound, 1).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(text(&m), "held");
    assert!(m.redelivered, "handed out before to a consumer that died");
    m.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
}

async fn consumers_come_and_go_without_disturbing_the_others(q: Arc<dyn Queue>) {
    // A long-lived consumer (a worker) while short-lived ones (subscribers)
    // come and go on another queue.
    let mut steady = q.consume(QueueName::Delivery, 10).await.unwrap();
    for i in 0..30 {
        let payload = format!("m{i}");
        q.publish(QueueName::App, msg(payload.as_bytes()))
            .await
            .unwrap();
        let mut c = q.consume(QueueName::App, 1).await.unwrap();
        let m = next(&mut c).await;
        assert_eq!(text(&m), payload);
        m.acker.ack().await.unwrap();
        drop(c);
    }
    assert!(q.is_connected());
    q.publish(QueueName::Delivery, msg(b"still here"))
        .await
        .unwrap();
    let m = next(&mut steady).await;
    assert_eq!(text(&m), "still here");
    assert!(!m.redelivered, "the steady consumer was never cut off");
    m.acker.ack().await.unwrap();
}

async fn publish_batch_keeps_the_order(q: Arc<dyn Queue>) {
    q.publish_batch(QueueName::Delivery, Vec::new())
        .await
        .unwrap();
    let sent: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    let before = now_ms();
    q.publish_batch(
        QueueName::Delivery,
        sent.iter().map(|s| msg(s.as_bytes())).collect(),
    )
    .await
    .unwrap();
    let after = now_ms();
    ready_becomes(&*q, QueueName::Delivery, 20).await;

    let mut c = q.consume(QueueName::Delivery, 50).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let m = next(&mut c).await;
        assert_eq!(m.kind.as_deref(), Some(KIND));
        assert!(!m.redelivered);
        let ready = m.ready_unix_ms.unwrap();
        assert!((before..=after).contains(&ready));
        got.push(text(&m).to_string());
        m.acker.ack().await.unwrap();
    }
    assert_eq!(got, sent, "consumed in the order published");
    nothing(&mut c, QUIET).await;
}

async fn prefetch_bounds_the_unacknowledged_messages(q: Arc<dyn Queue>) {
    q.publish_batch(QueueName::Fanout, vec![msg(b"a"), msg(b"b"), msg(b"c")])
        .await
        .unwrap();
    ready_becomes(&*q, QueueName::Fanout, 3).await;
    let mut c = q.consume(QueueName::Fanout, 2).await.unwrap();
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    assert_eq!((text(&a), text(&b)), ("a", "b"));
    // Two unacknowledged: the third waits, and is still ready.
    nothing(&mut c, QUIET).await;
    ready_becomes(&*q, QueueName::Fanout, 1).await;

    a.acker.ack().await.unwrap();
    let cm = next(&mut c).await;
    assert_eq!(text(&cm), "c");
    b.acker.ack().await.unwrap();
    cm.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
    assert_eq!(ready_messages(&*q, QueueName::Fanout).await.unwrap(), 0);
}

/// `ack_multiple` settles this message and the earlier ones its consumer
/// holds (one already acknowledged on its own included), never a later one
/// nor another consumer's.
async fn ack_multiple_settles_the_consumers_earlier_messages_only(q: Arc<dyn Queue>) {
    q.publish(QueueName::Fanout, msg(b"other")).await.unwrap();
    let mut other = q.consume(QueueName::Fanout, 1).await.unwrap();
    let held = next(&mut other).await;
    assert_eq!(text(&held), "other");

    let batch: Vec<OutMessage> = [b"a", b"b", b"c", b"d", b"e"]
        .into_iter()
        .map(|p| msg(p))
        .collect();
    q.publish_batch(QueueName::Fanout, batch).await.unwrap();
    let mut c = q.consume(QueueName::Fanout, 10).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut c).await);
    }
    let texts: Vec<&str> = got.iter().map(text).collect();
    assert_eq!(texts, ["a", "b", "c", "d", "e"]);
    got[1].acker.ack().await.unwrap();
    got[2].acker.ack_multiple().await.unwrap();
    // a, b and c are settled; d and e are held, unsettled.
    drop(got);
    drop(c);
    drop(held);
    drop(other);

    let mut c = q.consume(QueueName::Fanout, 10).await.unwrap();
    let mut back = Vec::new();
    for _ in 0..3 {
        let m = next(&mut c).await;
        assert!(m.redelivered);
        back.push(text(&m).to_string());
        m.acker.ack().await.unwrap();
    }
    back.sort();
    assert_eq!(back, ["d", "e", "other"]);
    nothing(&mut c, QUIET).await;
    ready_becomes(&*q, QueueName::Fanout, 0).await;
}

/// Many workers acknowledging at once: every acknowledged message is
/// settled, and the ones held unsettled or given back among them are not,
/// whatever their place.
async fn acks_at_once_settle_exactly_the_acknowledged_messages(q: Arc<dyn Queue>) {
    let batch: Vec<OutMessage> = (0..40).map(|i| msg(format!("m{i}").as_bytes())).collect();
    q.publish_batch(QueueName::Fanout, batch).await.unwrap();
    let mut c = q.consume(QueueName::Fanout, 40).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..40 {
        got.push(next(&mut c).await);
    }
    // The first, one in the middle and one given back stay unacknowledged.
    let held: Vec<Incoming> = vec![got.remove(20), got.remove(0)];
    let given_back = got.remove(27);
    given_back.acker.requeue().await.unwrap();
    let started = Instant::now();
    futures::future::join_all(got.iter().map(|m| m.acker.ack()))
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Closed at once, as a stopping worker does: RabbitMQ 3.10 applied a
    // quorum queue's acknowledgements after the channel's close had handed
    // its messages back, so one just acknowledged came back too (one of 37,
    // in most runs) until `close` waited for the broker to cancel the
    // consumer first.
    drop(got);
    drop(held);
    c.close().await;

    let mut c = q.consume(QueueName::Fanout, 40).await.unwrap();
    let mut back = Vec::new();
    for _ in 0..3 {
        let m = next(&mut c).await;
        back.push(text(&m).to_string());
        m.acker.ack().await.unwrap();
    }
    back.sort();
    assert_eq!(back, ["m0", "m20", "m29"]);
    nothing(&mut c, QUIET).await;
    ready_becomes(&*q, QueueName::Fanout, 0).await;
}

/// Workers finishing in any order, as they do: every message is settled
/// once (an acknowledgement naming a tag the broker had already settled
/// would close the channel and hand every message back).
async fn acks_in_any_order_settle_every_message(q: Arc<dyn Queue>) {
    const N: u64 = 300;
    let batch: Vec<OutMessage> = (0..N).map(|i| msg(format!("m{i}").as_bytes())).collect();
    q.publish_batch(QueueName::Fanout, batch).await.unwrap();
    let mut c = q.consume(QueueName::Fanout, N as u16).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..N {
        let m = next(&mut c).await;
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let wait = Duration::from_micros((seed >> 33) % 8_000);
        tasks.spawn(async move {
            tokio::time::sleep(wait).await;
            m.acker.ack().await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    c.close().await;
    let mut c = q.consume(QueueName::Fanout, 10).await.unwrap();
    nothing(&mut c, QUIET).await;
    ready_becomes(&*q, QueueName::Fanout, 0).await;
}

/// A delay's whole seconds are applied in full or longer (rounded up to a
/// tier), never cut short.
async fn a_delay_is_never_shortened(q: Arc<dyn Queue>) {
    for requested in [
        Duration::from_millis(5_500),
        Duration::from_secs(6),
        Duration::from_millis(10_001),
        Duration::from_secs(31),
    ] {
        let applied = q
            .publish_delayed(QueueName::Delivery, msg(b"later"), requested)
            .await
            .unwrap();
        assert!(
            applied.as_secs() >= requested.as_secs(),
            "applied {applied:?} for {requested:?}"
        );
    }
    assert_eq!(ready_messages(&*q, QueueName::Delivery).await.unwrap(), 0);
}

/// The three delivery classes are three queues, each with delays of its
/// own: a job delayed (parked) in a class comes back to that class's queue
/// and to no other.
async fn each_delivery_class_has_its_own_queue_and_delays(q: Arc<dyn Queue>) {
    use stampede_backends::queue::{class_name, ready_deliveries};
    use stampede_proto::queue::DeliveryClass;
    let names = full_names(&*q).await;
    for (class, suffix) in [
        (DeliveryClass::Interactive, "delivery.interactive"),
        (DeliveryClass::Normal, "delivery"),
        (DeliveryClass::Bulk, "delivery.bulk"),
    ] {
        let name = QueueName::delivery(class);
        assert_eq!(name.suffix(), suffix);
        assert_eq!(name.delivery_class(), Some(class));
        assert!(names[&name].ends_with(&format!(".{suffix}")), "{names:?}");
        q.publish_delayed(
            name,
            msg(class_name(class).as_bytes()),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    }
    assert_eq!(QueueName::Fanout.delivery_class(), None);
    assert_eq!(ready_deliveries(&*q).await.unwrap(), 0);
    for name in QueueName::DELIVERY {
        ready_becomes(&*q, name, 1).await;
    }
    assert_eq!(ready_deliveries(&*q).await.unwrap(), 3);
    for name in QueueName::DELIVERY {
        let mut c = q.consume(name, 10).await.unwrap();
        let m = next(&mut c).await;
        let class = name.delivery_class().map(class_name).unwrap();
        assert_eq!(text(&m), class, "consumed from {name:?}");
        assert_eq!(m.queue, name);
        m.acker.ack().await.unwrap();
        nothing(&mut c, QUIET).await;
    }
}

async fn a_delayed_message_waits_for_its_delay(q: Arc<dyn Queue>) {
    let requested = Duration::from_secs(1);
    let started = Instant::now();
    let published_ms = now_ms();
    let applied = q
        .publish_delayed(QueueName::Delivery, msg(b"soon"), requested)
        .await
        .unwrap();
    assert!(
        applied >= requested,
        "applied {applied:?} for {requested:?}"
    );
    // A longer delay published next does not hold the shorter one back.
    let long = q
        .publish_delayed(
            QueueName::Delivery,
            msg(b"much later"),
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    assert!(long >= Duration::from_secs(120), "applied {long:?}");
    assert_eq!(ready_messages(&*q, QueueName::Delivery).await.unwrap(), 0);

    // Not consumable before its delay...
    let mut c = q.consume(QueueName::Delivery, 10).await.unwrap();
    let early = applied
        .saturating_sub(Duration::from_millis(250))
        .saturating_sub(started.elapsed());
    nothing(&mut c, early).await;
    drop(c);

    // ...ready once it ended (consumed or not), then consumed.
    tokio::time::sleep_until((started + applied).into()).await;
    ready_becomes(&*q, QueueName::Delivery, 1).await;
    let mut c = q.consume(QueueName::Delivery, 10).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(text(&m), "soon");
    assert_eq!(m.kind.as_deref(), Some(KIND));
    assert!(!m.redelivered);
    assert_eq!(m.dead, None);
    let ready = m.ready_unix_ms.unwrap();
    let due = published_ms + applied.as_millis() as i64;
    assert!(
        ready >= due && ready <= now_ms(),
        "ready at {ready}, due at {due}"
    );
    m.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
}

async fn dead_letter_carries_the_reason_and_the_source(q: Arc<dyn Queue>) {
    let names = full_names(&*q).await;
    q.dead_letter(
        QueueName::Fanout,
        Some(KIND),
        b"\x00undecodable",
        "cannot decode",
    )
    .await
    .unwrap();
    q.dead_letter(QueueName::Inbound, None, b"untyped", "no type")
        .await
        .unwrap();
    ready_becomes(&*q, QueueName::Dead, 2).await;
    // Dead letters go to the dead-letter queue only.
    assert_eq!(ready_messages(&*q, QueueName::Fanout).await.unwrap(), 0);
    assert_eq!(ready_messages(&*q, QueueName::Inbound).await.unwrap(), 0);

    let mut c = q.consume(QueueName::Dead, 10).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(&m.payload[..], b"\x00undecodable");
    assert_eq!(m.kind.as_deref(), Some(KIND));
    assert_eq!(
        m.dead,
        Some(DeadInfo {
            reason: "cannot decode".into(),
            source: names[&QueueName::Fanout].clone(),
        })
    );
    m.acker.ack().await.unwrap();

    let m = next(&mut c).await;
    assert_eq!(text(&m), "untyped");
    assert_eq!(m.kind, None, "no type given, none set");
    assert_eq!(
        m.dead,
        Some(DeadInfo {
            reason: "no type".into(),
            source: names[&QueueName::Inbound].clone(),
        })
    );
    m.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
}

async fn an_accepted_event_reaches_the_app_queue_only(q: Arc<dyn Queue>) {
    let event = |p: &[u8]| OutMessage {
        kind: EVENT_KIND,
        payload: p.to_vec(),
        route: None,
    };
    q.publish_event("rejected", event(b"no")).await.unwrap();
    q.publish_event("accepted", event(b"yes")).await.unwrap();
    ready_becomes(&*q, QueueName::App, 1).await;
    for name in QueueName::ALL {
        if name != QueueName::App {
            assert_eq!(ready_messages(&*q, name).await.unwrap(), 0, "{name:?}");
        }
    }
    let mut c = q.consume(QueueName::App, 10).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(text(&m), "yes");
    assert_eq!(m.kind.as_deref(), Some(EVENT_KIND));
    assert!(!m.redelivered);
    m.acker.ack().await.unwrap();
    nothing(&mut c, QUIET).await;
}

async fn ack_with_event_publishes_the_event_and_acknowledges(q: Arc<dyn Queue>) {
    q.publish_batch(QueueName::Inbound, vec![msg(b"a"), msg(b"b")])
        .await
        .unwrap();
    let mut c = q.consume(QueueName::Inbound, 10).await.unwrap();
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    let event = |p: &[u8]| OutMessage {
        kind: EVENT_KIND,
        payload: p.to_vec(),
        route: None,
    };
    a.acker
        .ack_with_event(&*q, "accepted", event(b"verified a"))
        .await
        .unwrap();
    b.acker
        .ack_with_event(&*q, "rejected", event(b"rejected b"))
        .await
        .unwrap();
    drop((a, b, c));

    // Both messages are acknowledged: nothing comes back...
    let mut c = q.consume(QueueName::Inbound, 10).await.unwrap();
    nothing(&mut c, QUIET).await;
    assert_eq!(ready_messages(&*q, QueueName::Inbound).await.unwrap(), 0);
    // ...and only the accepted event reached the application.
    let mut app = q.consume(QueueName::App, 10).await.unwrap();
    let e = next(&mut app).await;
    assert_eq!(text(&e), "verified a");
    assert_eq!(e.kind.as_deref(), Some(EVENT_KIND));
    e.acker.ack().await.unwrap();
    nothing(&mut app, QUIET).await;
}

async fn depths_count_ready_messages_and_consumers(q: Arc<dyn Queue>) {
    let depths = q.depths().await.unwrap();
    // Every queue, once.
    assert_eq!(depths.len(), QueueName::ALL.len(), "{depths:?}");
    for name in QueueName::ALL {
        let n = depths.iter().filter(|d| d.name == name).count();
        assert_eq!(n, 1, "{name:?} in {depths:?}");
    }
    let mut full: Vec<&str> = depths.iter().map(|d| d.queue.as_str()).collect();
    full.sort_unstable();
    full.dedup();
    assert_eq!(full.len(), depths.len(), "full names are distinct");
    for d in &depths {
        assert!(d.queue.contains(d.name.suffix()), "{d:?}");
        assert_eq!((d.messages, d.consumers), (0, 0), "{d:?}");
    }

    q.publish_batch(QueueName::Fanout, vec![msg(b"1"), msg(b"2")])
        .await
        .unwrap();
    q.publish(QueueName::Delivery, msg(b"3")).await.unwrap();
    ready_becomes(&*q, QueueName::Fanout, 2).await;
    ready_becomes(&*q, QueueName::Delivery, 1).await;
    for name in [QueueName::Dead, QueueName::Inbound, QueueName::App] {
        assert_eq!(ready_messages(&*q, name).await.unwrap(), 0, "{name:?}");
    }

    let mut c = q.consume(QueueName::Fanout, 1).await.unwrap();
    consumers_become(&*q, QueueName::Fanout, 1).await;
    // A message handed out and not yet acknowledged is not ready.
    let m = next(&mut c).await;
    ready_becomes(&*q, QueueName::Fanout, 1).await;
    m.acker.ack().await.unwrap();
    drop(c);
    consumers_become(&*q, QueueName::Fanout, 0).await;
    ready_becomes(&*q, QueueName::Fanout, 1).await;
    ready_becomes(&*q, QueueName::Delivery, 1).await;
}

async fn messages_carry_the_publishers_trace_context(q: Arc<dyn Queue>) {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("contract")));
    async {
        // Outside any span: no trace context.
        q.publish(QueueName::Fanout, msg(b"untraced"))
            .await
            .unwrap();
        let span = tracing::info_span!("publish");
        let expected = span
            .in_scope(stampede_backends::trace::current_traceparent)
            .expect("a recorded span has a trace context");
        q.publish(QueueName::Fanout, msg(b"traced"))
            .instrument(span)
            .await
            .unwrap();

        let mut c = q.consume(QueueName::Fanout, 10).await.unwrap();
        let m = next(&mut c).await;
        assert_eq!(text(&m), "untraced");
        assert_eq!(m.traceparent, None);
        m.acker.ack().await.unwrap();
        let m = next(&mut c).await;
        assert_eq!(text(&m), "traced");
        assert_eq!(m.traceparent.as_deref(), Some(expected.as_str()));
        m.acker.ack().await.unwrap();
    }
    .with_subscriber(subscriber)
    .await;
}

/// The edge's publishes to the inbound queue, many at once on one
/// publisher: each is confirmed to its own caller, arrives once, and
/// carries its own publisher's trace.
async fn publishes_that_arrive_together_each_arrive_once_with_their_own_trace(q: Arc<dyn Queue>) {
    const N: usize = 300;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("contract")));
    let expected: HashMap<String, String> = async {
        let spans: Vec<(String, tracing::Span)> = (0..N)
            .map(|i| (format!("in{i:03}"), tracing::info_span!("edge", i)))
            .collect();
        let expected = spans
            .iter()
            .map(|(p, s)| {
                let tp = s
                    .in_scope(stampede_backends::trace::current_traceparent)
                    .expect("a recorded span has a trace context");
                (p.clone(), tp)
            })
            .collect();
        let results = futures::future::join_all(spans.into_iter().map(|(p, span)| {
            let q = q.clone();
            async move { q.publish(QueueName::Inbound, msg(p.as_bytes())).await }.instrument(span)
        }))
        .await;
        for r in results {
            r.unwrap();
        }
        expected
    }
    .with_subscriber(subscriber)
    .await;

    let mut c = q.consume(QueueName::Inbound, 500).await.unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..N {
        let m = next(&mut c).await;
        let p = text(&m).to_string();
        assert_eq!(
            m.traceparent.as_deref(),
            Some(expected[&p].as_str()),
            "{p} carries its own publisher's trace"
        );
        assert!(!m.redelivered);
        *seen.entry(p).or_default() += 1;
        m.acker.ack().await.unwrap();
    }
    nothing(&mut c, QUIET).await;
    assert_eq!(seen.len(), N, "every publish arrived");
    assert!(seen.values().all(|&n| n == 1), "none twice");
}
