//! The RabbitMQ implementation of [`Queue`]: durable quorum queues declared
//! idempotently at start, persistent messages, publisher confirms, manual
//! acknowledgement, and delayed retries held by the broker in delay tiers
//! (queues with a queue-level TTL that dead-letter back into the work queue;
//! per-message TTLs in one queue would stall behind longer ones).
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

use crate::queue::{Acker, Consumer, DeadInfo, Depth, Incoming, OutMessage, Queue, QueueName};
use crate::{Error, Result};

/// Delay tiers for retries, in seconds. A delay is rounded up to the next
/// tier; the longest tier caps it.
pub const DELAY_TIERS_SECS: &[u64] = &[5, 10, 30, 60, 300, 1800, 3600, 10800, 21600];

/// Queues whose messages can be delayed.
const DELAYED: [QueueName; 3] = [QueueName::Fanout, QueueName::Delivery, QueueName::Inbound];

/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-stampede-reason";
/// Header carrying the queue a dead-lettered message came from.
pub const SOURCE_HEADER: &str = "x-stampede-source";

/// The RabbitMQ queue.
#[derive(Clone)]
pub struct AmqpQueue {
    conn: Arc<Connection>,
    publisher: Channel,
    namespace: String,
}

impl AmqpQueue {
    /// Connects, opens a confirming publisher channel and declares the
    /// topology (idempotent: every process does it at start).
    pub async fn connect(url: &str, namespace: &str, connection_name: &str) -> Result<Self> {
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(connection_name.to_string()));
        let conn = Connection::connect(url, props).await?;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let q = Self {
            conn: Arc::new(conn),
            publisher,
            namespace: namespace.to_string(),
        };
        q.declare().await?;
        Ok(q)
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
        let ch = self.conn.create_channel().await?;
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
            ch.queue_declare(self.name(q).into(), durable, args).await?;
        }
        ch.exchange_declare(
            self.events_exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            self.name(QueueName::App).into(),
            self.events_exchange().into(),
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
                    AMQPValue::LongString(self.name(q).into()),
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
                ch.queue_declare(self.delay_name(q, *secs).into(), durable, args)
                    .await?;
            }
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    async fn send(
        &self,
        routing_key: String,
        kind: &str,
        payload: &[u8],
        headers: Option<FieldTable>,
    ) -> Result<lapin::PublisherConfirm> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(ShortString::from(kind));
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        Ok(self
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
        let ch = self.conn.create_channel().await?;
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
            self.send(self.name(queue), msg.kind, &msg.payload, None)
                .await?,
        )
        .await
    }

    async fn publish_batch(&self, queue: QueueName, msgs: Vec<OutMessage>) -> Result<()> {
        let name = self.name(queue);
        let mut pending = Vec::with_capacity(msgs.len());
        for m in &msgs {
            pending.push(self.send(name.clone(), m.kind, &m.payload, None).await?);
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
        confirmed(self.send(target, msg.kind, &msg.payload, None).await?).await?;
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
                kind.unwrap_or(""),
                payload,
                Some(h),
            )
            .await?;
        confirmed(c).await
    }

    async fn publish_event(&self, routing_key: &str, msg: OutMessage) -> Result<()> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(ShortString::from(msg.kind));
        // Not mandatory: an event nobody binds to is not an error.
        let c = self
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
        let ch = self.conn.create_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                self.name(queue).into(),
                ShortString::from(format!("stampede-{}", uuid::Uuid::new_v4())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Box::new(AmqpConsumer {
            inner: consumer,
            channel: ch,
        }))
    }

    async fn depths(&self) -> Result<Vec<Depth>> {
        let ch = self.conn.create_channel().await?;
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
                queue: name,
                messages: u64::from(d.message_count()),
                consumers: u64::from(d.consumer_count()),
            });
        }
        let _ = ch.close(200, "status".into()).await;
        Ok(out)
    }

    fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }
}

struct AmqpConsumer {
    inner: lapin::Consumer,
    channel: Channel,
}

impl Drop for AmqpConsumer {
    /// Closing the channel hands every unacknowledged message back to the
    /// queue at once (a dropped subscriber, a stopping worker).
    fn drop(&mut self) {
        let ch = self.channel.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = ch.close(200, "consumer closed".into()).await;
            });
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Result<Incoming>> {
        let d = match self.inner.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e.into())),
        };
        Some(Ok(Incoming {
            kind: d.properties.kind().as_ref().map(|k| k.as_str().to_string()),
            payload: Bytes::from(d.data),
            redelivered: d.redelivered,
            dead: dead_info(&d.properties),
            acker: Box::new(AmqpAcker(d.acker)),
        }))
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
