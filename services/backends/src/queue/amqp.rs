//! The RabbitMQ implementation of [`Queue`]: durable quorum queues declared
//! idempotently at start, persistent messages, publisher confirms, manual
//! acknowledgement, and delayed retries held by the broker in delay tiers
//! (queues with a queue-level TTL that dead-letter back into the work queue;
//! per-message TTLs in one queue would stall behind longer ones).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use tokio::sync::{watch, RwLock};

use crate::clock::now_ms;
use crate::queue::{Acker, Consumer, DeadInfo, Depth, Incoming, OutMessage, Queue, QueueName};
use crate::{Error, Result};

/// Delay tiers for retries, in seconds. A delay is rounded up to the next
/// tier; the longest tier caps it.
pub const DELAY_TIERS_SECS: &[u64] = &[5, 10, 30, 60, 300, 1800, 3600, 10800, 21600];

/// Queues whose messages can be delayed: each delivery class has delay
/// tiers of its own, so a parked job comes back to its own class's queue.
const DELAYED: [QueueName; 5] = [
    QueueName::Fanout,
    QueueName::DeliveryInteractive,
    QueueName::Delivery,
    QueueName::DeliveryBulk,
    QueueName::Inbound,
];

/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-stampede-reason";
/// Header carrying the queue a dead-lettered message came from.
pub const SOURCE_HEADER: &str = "x-stampede-source";

/// The RabbitMQ queue.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
    namespace: String,
}

/// One connection and its confirming publisher channel.
#[derive(Clone)]
struct Link {
    conn: Arc<Connection>,
    publisher: Channel,
}

struct Inner {
    url: String,
    connection_name: String,
    namespace: String,
    link: RwLock<Link>,
    /// Bumped on every reconnection; consumers and publishers wait on it.
    generation: watch::Sender<u64>,
    connected: AtomicBool,
}

/// How long a publisher waits for the broker to come back before failing.
const RECONNECT_WAIT: Duration = Duration::from_secs(10);
/// Backoff between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

async fn open_link(url: &str, connection_name: &str) -> Result<Link> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name.to_string()));
    let conn = Connection::connect(url, props).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Link {
        conn: Arc::new(conn),
        publisher,
    })
}

impl AmqpQueue {
    /// Connects, opens a confirming publisher channel and declares the
    /// topology (idempotent: every process does it at start). A supervisor
    /// then reconnects with backoff whenever the connection drops: while it
    /// is down `is_connected` is false (readiness says so), publishers wait
    /// for it up to 10 s and then fail, and consumers resume on the new
    /// connection (what they held unacknowledged the broker redelivers).
    pub async fn connect(url: &str, namespace: &str, connection_name: &str) -> Result<Self> {
        let link = open_link(url, connection_name).await?;
        let (generation, _) = watch::channel(0);
        let q = Self {
            inner: Arc::new(Inner {
                url: url.to_string(),
                connection_name: connection_name.to_string(),
                namespace: namespace.to_string(),
                link: RwLock::new(link),
                generation,
                connected: AtomicBool::new(true),
            }),
            namespace: namespace.to_string(),
        };
        q.declare().await?;
        tokio::spawn(supervise(Arc::downgrade(&q.inner)));
        Ok(q)
    }

    /// The current link, waiting for a reconnection when the broker is away.
    async fn link(&self) -> Result<Link> {
        let mut rx = self.inner.generation.subscribe();
        let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
        loop {
            if self.inner.connected.load(Ordering::Acquire) {
                let link = self.inner.link.read().await.clone();
                if link.conn.status().connected() {
                    return Ok(link);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(Error::Queue("the broker is unreachable".into())),
            }
        }
    }

    /// Full name of a queue.
    pub fn name(&self, q: QueueName) -> String {
        format!("{}.{}", self.namespace, q.suffix())
    }

    /// The topic exchange verified inbound activities are published to.
    pub fn events_exchange(&self) -> String {
        format!("{}.verified", self.namespace)
    }

    fn delay_name(&self, q: QueueName, secs: u64) -> String {
        format!("{}.{}.delay.{secs}s", self.namespace, q.suffix())
    }

    async fn declare(&self) -> Result<()> {
        let conn = self.inner.link.read().await.conn.clone();
        declare(&conn, &self.namespace).await
    }

    async fn send(
        &self,
        routing_key: String,
        kind: Option<&str>,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<lapin::PublisherConfirm> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        // No kind, no `type` property: consumed, the kind is `None` again.
        if let Some(kind) = kind {
            props = props.with_type(ShortString::from(kind));
        }
        Ok(self
            .link()
            .await?
            .publisher
            .basic_publish(
                ShortString::from(""),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                props,
            )
            .await?)
    }

    /// Deletes every queue of this namespace (tests clean up with it).
    pub async fn delete_all(&self) -> Result<()> {
        let ch = self.link().await?.conn.create_channel().await?;
        let mut names: Vec<String> = QueueName::ALL.iter().map(|q| self.name(*q)).collect();
        for q in DELAYED {
            for secs in DELAY_TIERS_SECS {
                names.push(self.delay_name(q, *secs));
            }
        }
        for n in names {
            ch.queue_delete(n.into(), Default::default()).await?;
        }
        ch.exchange_delete(self.events_exchange().into(), Default::default())
            .await?;
        Ok(())
    }
}

async fn declare(conn: &Connection, namespace: &str) -> Result<()> {
    let ch = conn.create_channel().await?;

    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for q in QueueName::ALL {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(format!("{namespace}.{}", q.suffix()).into(), durable, args)
            .await?;
    }
    ch.exchange_declare(
        format!("{namespace}.verified").into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        format!("{namespace}.{}", QueueName::App.suffix()).into(),
        format!("{namespace}.verified").into(),
        "accepted".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for q in DELAYED {
        for secs in DELAY_TIERS_SECS {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt((*secs * 1000) as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(format!("{namespace}.{}", q.suffix()).into()),
            );
            // Quorum queues dead-letter at-least-once only with reject-publish overflow.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            ch.queue_declare(
                format!("{namespace}.{}.delay.{secs}s", q.suffix()).into(),
                durable,
                args,
            )
            .await?;
        }
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Watches the connection and replaces it when it drops, with backoff.
async fn supervise(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(i) = inner.upgrade() else { return };
        if i.link.read().await.conn.status().connected() {
            continue;
        }
        i.connected.store(false, Ordering::Release);
        tracing::warn!(connection = %i.connection_name, "broker connection lost; reconnecting");
        let mut backoff = BACKOFF_MIN;
        loop {
            match open_link(&i.url, &i.connection_name).await {
                Ok(link) => match declare(&link.conn, &i.namespace).await {
                    Ok(()) => {
                        *i.link.write().await = link;
                        i.connected.store(true, Ordering::Release);
                        i.generation.send_modify(|g| *g += 1);
                        tracing::info!(connection = %i.connection_name, "broker connection restored");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "declaring after reconnect failed"),
                },
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if Arc::strong_count(&i) == 1 {
                return;
            }
        }
    }
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<()> {
    let c = confirm.await?;
    if c.is_nack() {
        return Err(Error::Queue("the broker refused the message (nack)".into()));
    }
    if let Some(ret) = c.take_message() {
        return Err(Error::Queue(format!(
            "message returned unroutable: {}",
            ret.reply_text
        )));
    }
    Ok(())
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn publish(&self, queue: QueueName, msg: OutMessage) -> Result<()> {
        confirmed(
            self.send(
                self.name(queue),
                Some(msg.kind),
                &msg.payload,
                message_headers(None, now_ms()),
            )
            .await?,
        )
        .await
    }

    async fn publish_batch(&self, queue: QueueName, msgs: Vec<OutMessage>) -> Result<()> {
        let name = self.name(queue);
        let mut pending = Vec::with_capacity(msgs.len());
        // One trace context and ready time for the whole batch.
        let headers = message_headers(None, now_ms());
        for m in &msgs {
            pending.push(
                self.send(name.clone(), Some(m.kind), &m.payload, headers.clone())
                    .await?,
            );
        }
        for p in pending {
            confirmed(p).await?;
        }
        Ok(())
    }

    async fn publish_delayed(
        &self,
        queue: QueueName,
        msg: OutMessage,
        delay: Duration,
    ) -> Result<Duration> {
        let want = delay.as_secs().max(1);
        let tier = DELAY_TIERS_SECS
            .iter()
            .copied()
            .find(|t| *t >= want)
            .unwrap_or(DELAY_TIERS_SECS[DELAY_TIERS_SECS.len() - 1]);
        if !DELAYED.contains(&queue) {
            return Err(Error::Queue(format!(
                "queue {} has no delays",
                queue.suffix()
            )));
        }
        let target = self.delay_name(queue, tier);
        let ready = now_ms() + (tier * 1000) as i64;
        confirmed(
            self.send(
                target,
                Some(msg.kind),
                &msg.payload,
                message_headers(None, ready),
            )
            .await?,
        )
        .await?;
        Ok(Duration::from_secs(tier))
    }

    async fn dead_letter(
        &self,
        from: QueueName,
        kind: Option<&str>,
        payload: &[u8],
        reason: &str,
    ) -> Result<()> {
        let mut h = FieldTable::default();
        h.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        h.insert(
            SOURCE_HEADER.into(),
            AMQPValue::LongString(self.name(from).into()),
        );
        let c = self
            .send(
                self.name(QueueName::Dead),
                kind,
                payload,
                message_headers(Some(h), now_ms()),
            )
            .await?;
        confirmed(c).await
    }

    async fn publish_event(&self, routing_key: &str, msg: OutMessage) -> Result<()> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(ShortString::from(msg.kind))
            .with_headers(message_headers(None, now_ms()));
        // Not mandatory: an event nobody binds to is not an error.
        let c = self
            .link()
            .await?
            .publisher
            .basic_publish(
                self.events_exchange().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &msg.payload,
                props,
            )
            .await?;
        confirmed(c).await
    }

    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<Box<dyn Consumer>> {
        let current = self.start_consumer(queue, prefetch).await?;
        Ok(Box::new(AmqpConsumer {
            queue: self.clone(),
            name: queue,
            prefetch,
            current: Some(current),
        }))
    }

    async fn depths(&self) -> Result<Vec<Depth>> {
        let ch = self.link().await?.conn.create_channel().await?;
        let mut out = Vec::new();
        for q in QueueName::ALL {
            let name = self.name(q);
            let d = ch
                .queue_declare(
                    name.clone().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            out.push(Depth {
                name: q,
                queue: name,
                messages: u64::from(d.message_count()),
                consumers: u64::from(d.consumer_count()),
            });
        }
        let _ = ch.close(200, "status".into()).await;
        Ok(out)
    }

    fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }
}

impl AmqpQueue {
    async fn start_consumer(
        &self,
        queue: QueueName,
        prefetch: u16,
    ) -> Result<(lapin::Consumer, Channel)> {
        let ch = self.link().await?.conn.create_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                self.name(queue).into(),
                ShortString::from(format!("stampede-{}", uuid::Uuid::new_v4())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((consumer, ch))
    }
}

/// A consumer that survives reconnections: when its channel goes, it waits
/// for the new connection and consumes again.
struct AmqpConsumer {
    queue: AmqpQueue,
    name: QueueName,
    prefetch: u16,
    current: Option<(lapin::Consumer, Channel)>,
}

impl Drop for AmqpConsumer {
    /// Closing the channel hands every unacknowledged message back to the
    /// queue at once (a dropped subscriber, a stopping worker).
    ///
    /// The lapin consumer is dropped only once the channel is closed: dropped
    /// first, it sends a `basic.cancel` that could reach the broker after the
    /// `channel.close`, which the broker answers by closing the whole
    /// connection (every other consumer and publisher on it).
    fn drop(&mut self) {
        let Some((consumer, ch)) = self.current.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = ch.close(200, "consumer closed".into()).await;
                drop(consumer);
            });
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Result<Incoming>> {
        let d = loop {
            let Some((consumer, _)) = self.current.as_mut() else {
                match self.queue.start_consumer(self.name, self.prefetch).await {
                    Ok(c) => {
                        tracing::info!(queue = self.name.suffix(), "consuming again");
                        self.current = Some(c);
                    }
                    Err(e) => {
                        tracing::debug!(queue = self.name.suffix(), error = %e, "cannot consume yet");
                        tokio::time::sleep(BACKOFF_MAX / 5).await;
                    }
                }
                continue;
            };
            match consumer.next().await {
                Some(Ok(d)) => break d,
                Some(Err(e)) => {
                    tracing::warn!(queue = self.name.suffix(), error = %e, "consumer lost; resuming after reconnection");
                }
                None => {
                    tracing::warn!(queue = self.name.suffix(), "consumer cancelled; resuming");
                }
            }
            self.current = None;
        };
        Some(Ok(Incoming {
            queue: self.name,
            kind: d.properties.kind().as_ref().map(|k| k.as_str().to_string()),
            payload: Bytes::from(d.data),
            redelivered: d.redelivered,
            ready_unix_ms: ready_ms(&d.properties),
            traceparent: traceparent(&d.properties),
            dead: dead_info(&d.properties),
            acker: Box::new(AmqpAcker(d.acker)),
        }))
    }
}

/// Header carrying when a message becomes ready (unix ms).
const READY_HEADER: &str = "x-stampede-ready-ms";
/// W3C trace context of the publisher's span.
const TRACEPARENT_HEADER: &str = "traceparent";

/// Headers every message carries: when it is ready and, when tracing, the
/// publisher's trace context.
fn message_headers(extra: Option<FieldTable>, ready_ms: i64) -> FieldTable {
    let mut h = extra.unwrap_or_default();
    h.insert(READY_HEADER.into(), AMQPValue::LongLongInt(ready_ms));
    if let Some(tp) = crate::trace::current_traceparent() {
        h.insert(TRACEPARENT_HEADER.into(), AMQPValue::LongString(tp.into()));
    }
    h
}

fn traceparent(props: &BasicProperties) -> Option<String> {
    match props.headers().as_ref()?.inner().get(TRACEPARENT_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn ready_ms(props: &BasicProperties) -> Option<i64> {
    match props.headers().as_ref()?.inner().get(READY_HEADER)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// The reason and source headers of a dead-lettered message.
fn dead_info(props: &BasicProperties) -> Option<DeadInfo> {
    let h = props.headers().as_ref()?;
    let text = |name: &str| match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    };
    Some(DeadInfo {
        reason: text(REASON_HEADER)?,
        source: text(SOURCE_HEADER).unwrap_or_default(),
    })
}

struct AmqpAcker(lapin::Acker);

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<()> {
        self.0.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn requeue(&self) -> Result<()> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await?;
        Ok(())
    }
}
