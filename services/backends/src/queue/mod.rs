//! The queue the services are written against: named durable queues,
//! publisher-confirmed publishing, manual acknowledgement, delayed retries and
//! a dead-letter queue for messages that cannot be processed. Two
//! implementations keep this contract, checked by one test suite
//! (`tests/contract/`): RabbitMQ ([`amqp`]) and a SQLite file of the
//! embedded layout ([`embedded`]).
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use stampede_proto::queue::DeliveryClass;

use crate::Result;

pub mod amqp;
pub mod embedded;

/// The queues of stampede.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueName {
    /// ingest -> fanout: `FanoutJob`.
    Fanout,
    /// fanout -> delivery: `DeliveryJob` of the `normal` class (the queue
    /// every delivery job went to before classes: its name is kept).
    Delivery,
    /// fanout -> delivery: `DeliveryJob` of the `interactive` class
    /// (Accept, Reject, Follow, Undo, DMs and mentions).
    DeliveryInteractive,
    /// fanout -> delivery: `DeliveryJob` of the `bulk` class (fanouts to a
    /// large audience, retries).
    DeliveryBulk,
    /// Messages that could not be processed, with the reason.
    Dead,
    /// ingest -> inbox: `InboundJob`.
    Inbound,
    /// Verified activities for the application (`VerifiedActivity`), bound
    /// to the verified-events exchange.
    App,
}

impl QueueName {
    /// Every queue, for declaring and for status.
    pub const ALL: [QueueName; 7] = [
        QueueName::Fanout,
        QueueName::DeliveryInteractive,
        QueueName::Delivery,
        QueueName::DeliveryBulk,
        QueueName::Dead,
        QueueName::Inbound,
        QueueName::App,
    ];

    /// The name's suffix after the namespace.
    pub fn suffix(self) -> &'static str {
        match self {
            QueueName::Fanout => "fanout",
            QueueName::Delivery => "delivery",
            QueueName::DeliveryInteractive => "delivery.interactive",
            QueueName::DeliveryBulk => "delivery.bulk",
            QueueName::Dead => "dead",
            QueueName::Inbound => "inbound",
            QueueName::App => "app",
        }
    }

    /// The delivery queues, one per class, in priority order.
    pub const DELIVERY: [QueueName; 3] = [
        QueueName::DeliveryInteractive,
        QueueName::Delivery,
        QueueName::DeliveryBulk,
    ];

    /// The delivery queue of a class.
    pub fn delivery(class: DeliveryClass) -> QueueName {
        match class {
            DeliveryClass::Interactive => QueueName::DeliveryInteractive,
            DeliveryClass::Normal => QueueName::Delivery,
            DeliveryClass::Bulk => QueueName::DeliveryBulk,
        }
    }

    /// The class of a delivery queue; `None` for the other queues.
    pub fn delivery_class(self) -> Option<DeliveryClass> {
        match self {
            QueueName::DeliveryInteractive => Some(DeliveryClass::Interactive),
            QueueName::Delivery => Some(DeliveryClass::Normal),
            QueueName::DeliveryBulk => Some(DeliveryClass::Bulk),
            _ => None,
        }
    }
}

/// The name of a delivery class in configuration, metrics and status
/// (`interactive`, `normal`, `bulk`).
pub fn class_name(class: DeliveryClass) -> &'static str {
    match class {
        DeliveryClass::Interactive => "interactive",
        DeliveryClass::Normal => "normal",
        DeliveryClass::Bulk => "bulk",
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// Full protobuf message name (`stampede.queue.v1.DeliveryJob`), carried
    /// as the AMQP `type` property.
    pub kind: &'static str,
    /// Encoded protobuf.
    pub payload: Vec<u8>,
    /// Which shard of a sharded delivery queue it goes to (a hash of the
    /// inbox's host, [`route_of`]: a host's jobs share one); `None`: any.
    pub route: Option<u64>,
}

impl OutMessage {
    /// A message of `kind` with no route.
    pub fn new(kind: &'static str, payload: Vec<u8>) -> Self {
        Self {
            kind,
            payload,
            route: None,
        }
    }
}

/// The route of a host's delivery jobs: FNV-1a of its name, the same in
/// every process and version.
pub fn route_of(host: &str) -> u64 {
    host.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What a consumer does with a message it received.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The effect is durable: remove the message.
    async fn ack(&self) -> Result<()>;
    /// The effects of this message and of every message its consumer
    /// received before it and has not settled are durable: removes them
    /// all in one acknowledgement (AMQP `basic.ack` with `multiple`). The
    /// ackers of the earlier ones are then spent: drop them unused. Only
    /// for a consumer that settles nothing out of order behind the caller's
    /// back (the application's stream: ids handed out in order).
    async fn ack_multiple(&self) -> Result<()>;
    /// Give the message back to the queue (shutdown, transient failure before any effect).
    async fn requeue(&self) -> Result<()>;
    /// Publishes an event (see [`Queue::publish_event`]) whose publication is
    /// this message's whole effect, then acknowledges the message. The
    /// embedded queue does both in one transaction; a broker publishes
    /// (confirmed) and then acknowledges.
    async fn ack_with_event(
        &self,
        queue: &dyn Queue,
        routing_key: &str,
        event: OutMessage,
    ) -> Result<()> {
        queue.publish_event(routing_key, event).await?;
        self.ack().await
    }
}

/// A message received from a queue.
pub struct Incoming {
    /// The queue it was taken from (a worker consuming several, as
    /// delivery does one per class, tells them apart by it).
    pub queue: QueueName,
    /// The `type` property, when set.
    pub kind: Option<String>,
    /// The payload.
    pub payload: Bytes,
    /// Whether the broker delivered it before (a consumer died holding it).
    pub redelivered: bool,
    /// When it became ready to consume (published, or its delay ended),
    /// unix milliseconds, when known.
    pub ready_unix_ms: Option<i64>,
    /// W3C `traceparent` of the span that published it, when tracing.
    pub traceparent: Option<String>,
    /// On the dead-letter queue: why the message was moved there and the
    /// queue it came from.
    pub dead: Option<DeadInfo>,
    /// Settles the message.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("queue", &self.queue)
            .field("kind", &self.kind)
            .field("len", &self.payload.len())
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

/// Why a message is on the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadInfo {
    /// The reason given by the worker that gave up on it.
    pub reason: String,
    /// Full name of the queue it came from.
    pub source: String,
}

/// A stream of messages from one queue.
#[async_trait]
pub trait Consumer: Send {
    /// The next message; `None` when the consumer was cancelled or the
    /// connection is gone.
    async fn next(&mut self) -> Option<Result<Incoming>>;

    /// Stops consuming once everything acknowledged so far is settled; what
    /// is held unsettled goes back to the queue. A stopping worker awaits it
    /// after its last acknowledgement (dropping the consumer closes it in the
    /// background, which a process that exits next may not wait for).
    async fn close(self: Box<Self>) {}
}

/// Depth of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Depth {
    /// Which queue.
    pub name: QueueName,
    /// Full queue name.
    pub queue: String,
    /// Ready messages.
    pub messages: u64,
    /// Consumers attached.
    pub consumers: u64,
}

/// Ready messages in one of stampede's queues.
pub async fn ready_messages(q: &dyn Queue, name: QueueName) -> Result<u64> {
    Ok(q.depths()
        .await?
        .into_iter()
        .find(|d| d.name == name)
        .map_or(0, |d| d.messages))
}

/// Ready messages in the delivery queues of every class together.
pub async fn ready_deliveries(q: &dyn Queue) -> Result<u64> {
    Ok(q.depths()
        .await?
        .into_iter()
        .filter(|d| d.name.delivery_class().is_some())
        .map(|d| d.messages)
        .sum())
}

/// The broker.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Publishes one message; returns once the broker confirmed it durable.
    async fn publish(&self, queue: QueueName, msg: OutMessage) -> Result<()>;
    /// Publishes many messages, pipelined; returns once all are confirmed.
    async fn publish_batch(&self, queue: QueueName, msgs: Vec<OutMessage>) -> Result<()>;
    /// Publishes a message that reaches `queue` after about `delay` (held by
    /// the broker, never by a sleeping worker). Returns the delay applied:
    /// never less than `delay`'s whole seconds (RabbitMQ rounds those up to
    /// a delay tier; a fraction of a second may come early, which costs a
    /// parked job one more look, where rounding it up could double a wait).
    async fn publish_delayed(
        &self,
        queue: QueueName,
        msg: OutMessage,
        delay: Duration,
    ) -> Result<Duration>;
    /// Moves a message that cannot be processed to the dead-letter queue,
    /// with the reason and the queue it came from. Confirmed.
    async fn dead_letter(
        &self,
        from: QueueName,
        kind: Option<&str>,
        payload: &[u8],
        reason: &str,
    ) -> Result<()>;
    /// Publishes an event of inbound verification to the verified-events
    /// exchange the application can bind to; `routing_key` is the verdict
    /// (`accepted` reaches the application's queue). Confirmed.
    async fn publish_event(&self, routing_key: &str, msg: OutMessage) -> Result<()>;
    /// Starts consuming with at most `prefetch` unacknowledged messages.
    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<Box<dyn Consumer>>;
    /// Depths of stampede's queues.
    async fn depths(&self) -> Result<Vec<Depth>>;
    /// Whether the broker connection is up.
    fn is_connected(&self) -> bool;
}
