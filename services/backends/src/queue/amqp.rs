//! The RabbitMQ implementation of [`Queue`]: durable quorum queues declared
//! idempotently at start, persistent messages, publisher confirms, manual
//! acknowledgement, and delayed retries held by the broker in delay tiers
//! (queues with a queue-level TTL that dead-letter back into the work queue;
//! per-message TTLs in one queue would stall behind longer ones).
//!
//! On a cluster the process is given every node's URL: it connects to the
//! first that answers and moves on to the next when its node goes. A
//! publish whose confirm was lost with its node is sent again on the next
//! connection, marked so that its consumer treats it as possibly seen
//! (`Incoming::redelivered`). The delivery classes can be sharded over K
//! quorum queues each, so that their Raft leaders spread over the nodes.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
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

/// Header marking a message published again after its first publish's
/// confirm was lost: it may be on the queue twice.
const REPUBLISHED_HEADER: &str = "x-stampede-republished";

/// How the topology is laid out.
#[derive(Debug, Clone, Copy)]
pub struct AmqpOptions {
    /// Quorum queues per delivery class (1: the class's queue alone).
    pub delivery_shards: u16,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self { delivery_shards: 1 }
    }
}

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
    /// The nodes, in the order given.
    urls: Vec<String>,
    /// Index in `urls` of the node the current link is on.
    node: AtomicUsize,
    connection_name: String,
    namespace: String,
    shards: u16,
    /// Spreads the messages that name no route over the shards.
    spread: AtomicU64,
    link: RwLock<Link>,
    /// Bumped on every reconnection; consumers and publishers wait on it.
    generation: watch::Sender<u64>,
    connected: AtomicBool,
}

/// How long a publisher waits for the broker to come back before failing.
const RECONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long one node may take to accept a connection before the next is
/// tried (a partitioned node does not refuse: it does not answer).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish keeps being retried over reconnections before its
/// caller is told it failed (the edge answers 503 then: a remote server's
/// request should not wait much longer).
const PUBLISH_RETRY: Duration = Duration::from_secs(10);
/// How long the broker may take to confirm a publish. A quorum queue whose
/// leader is lost confirms once a new one is elected (seconds).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);
/// Backoff between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A link to the first node that answers, trying them in order from
/// `start`; returns it with its node's index. Errors name the node by its
/// place in the list, never its URL (which carries the password).
async fn open_any(urls: &[String], start: usize, connection_name: &str) -> Result<(Link, usize)> {
    let n = urls.len();
    let mut last = String::new();
    for k in 0..n {
        let i = (start + k) % n;
        match tokio::time::timeout(CONNECT_TIMEOUT, open_link(&urls[i], connection_name)).await {
            Ok(Ok(link)) => return Ok((link, i)),
            Ok(Err(e)) => last = format!("node {} of {n}: {e}", i + 1),
            Err(_) => {
                last = format!(
                    "node {} of {n}: no answer within {}s",
                    i + 1,
                    CONNECT_TIMEOUT.as_secs()
                )
            }
        }
    }
    Err(Error::Queue(format!("no broker node answered ({last})")))
}

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
    ///
    /// `url` is one URL or several, comma-separated (the nodes of a
    /// cluster).
    pub async fn connect(url: &str, namespace: &str, connection_name: &str) -> Result<Self> {
        Self::connect_with(url, namespace, connection_name, AmqpOptions::default()).await
    }

    /// [`AmqpQueue::connect`] with the topology's options.
    pub async fn connect_with(
        url: &str,
        namespace: &str,
        connection_name: &str,
        options: AmqpOptions,
    ) -> Result<Self> {
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            return Err(Error::Queue("no broker URL given".into()));
        }
        // A node that takes the connection but cannot declare (say, a
        // quorum queue's leader it cannot reach) is passed over too.
        let shards = options.delivery_shards.max(1);
        let mut start = 0;
        let mut tries = 0;
        let (link, node) = loop {
            let (link, node) = open_any(&urls, start, connection_name).await?;
            match declare(&link.conn, namespace, shards).await {
                Ok(()) => break (link, node),
                Err(e) if tries + 1 < urls.len() => {
                    tracing::warn!(error = %e, node = node + 1, nodes = urls.len(), "declaring failed; trying the next node");
                    tries += 1;
                    start = (node + 1) % urls.len();
                }
                Err(e) => return Err(e),
            }
        };
        let (generation, _) = watch::channel(0);
        let q = Self {
            inner: Arc::new(Inner {
                urls,
                node: AtomicUsize::new(node),
                connection_name: connection_name.to_string(),
                namespace: namespace.to_string(),
                shards,
                spread: AtomicU64::new(0),
                link: RwLock::new(link),
                generation,
                connected: AtomicBool::new(true),
            }),
            namespace: namespace.to_string(),
        };
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
                if link.conn.status().connected() && link.publisher.status().connected() {
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

    /// The quorum queues of `q`: its shards for a delivery class (the
    /// first is the class's own queue), else the queue alone.
    pub fn queue_names(&self, q: QueueName) -> Vec<String> {
        shard_names(&self.namespace, q, self.inner.shards)
    }

    /// The queue a message for `q` goes to: its route's shard, or the next
    /// one in turn when it names none.
    fn target(&self, q: QueueName, route: Option<u64>) -> String {
        let k = u64::from(self.inner.shards);
        if k <= 1 || q.delivery_class().is_none() {
            return self.name(q);
        }
        let i = route.unwrap_or_else(|| self.inner.spread.fetch_add(1, Ordering::Relaxed)) % k;
        shard_name(&self.namespace, q, i as u16)
    }

    /// Replaces the publisher channel with a new one on the same
    /// connection: a channel whose publishes a quorum queue kept refusing
    /// after its leader moved is not used again.
    async fn reopen_publisher(&self) {
        let conn = self.inner.link.read().await.conn.clone();
        if !conn.status().connected() {
            return;
        }
        let ch = match conn.create_channel().await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "reopening the publisher channel failed");
                return;
            }
        };
        if let Err(e) = ch.confirm_select(ConfirmSelectOptions::default()).await {
            tracing::warn!(error = %e, "reopening the publisher channel failed");
            return;
        }
        let old = std::mem::replace(&mut self.inner.link.write().await.publisher, ch);
        self.inner.generation.send_modify(|g| *g += 1);
        tracing::info!(connection = %self.inner.connection_name, "publisher channel replaced after the broker refused publishes");
        let _ = old.close(200, "replaced".into()).await;
    }

    /// Publishes to the default exchange and waits for the broker's
    /// confirm, again on the next connection when the node went before it
    /// confirmed (then marked as possibly published twice), for up to 30 s.
    async fn publish_confirmed(
        &self,
        routing_key: &str,
        kind: Option<&str>,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<()> {
        self.publish_all(routing_key, &[(kind, payload)], headers)
            .await
    }

    /// Publishes every message of `msgs` to `routing_key` (pipelined) and
    /// waits for all their confirms; those whose confirm failed are sent
    /// again, marked, until [`PUBLISH_RETRY`] has passed.
    async fn publish_all(
        &self,
        routing_key: &str,
        msgs: &[(Option<&str>, &[u8])],
        mut headers: FieldTable,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + PUBLISH_RETRY;
        let mut left: Vec<usize> = (0..msgs.len()).collect();
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut pending = Vec::with_capacity(left.len());
            let mut failed = Vec::new();
            let mut last: Option<Error> = None;
            for &i in &left {
                let (kind, payload) = msgs[i];
                match self.send(routing_key, kind, payload, headers.clone()).await {
                    Ok(c) => pending.push((i, c)),
                    Err(e) => {
                        failed.push(i);
                        last = Some(e);
                    }
                }
            }
            for (i, c) in pending {
                match confirmed(c).await {
                    Ok(()) => {}
                    Err(e @ Error::Queue(_)) if is_final(&e) => return Err(e),
                    Err(e) => {
                        failed.push(i);
                        last = Some(e);
                    }
                }
            }
            let Some(e) = last else { return Ok(()) };
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(e);
            }
            tracing::warn!(
                connection = %self.inner.connection_name,
                messages = failed.len(),
                error = %e,
                "publish not confirmed; sending again on the next connection"
            );
            headers.insert(REPUBLISHED_HEADER.into(), AMQPValue::Boolean(true));
            if is_nack(&e) {
                self.reopen_publisher().await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            failed.sort_unstable();
            left = failed;
        }
    }

    async fn send(
        &self,
        routing_key: &str,
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
        let mut names: Vec<String> = QueueName::ALL
            .iter()
            .flat_map(|q| self.queue_names(*q))
            .collect();
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

/// The name of shard `i` of a delivery class's queue: the class's own
/// queue for the first, `{queue}.shard{i}` for the others.
fn shard_name(namespace: &str, q: QueueName, i: u16) -> String {
    if i == 0 {
        format!("{namespace}.{}", q.suffix())
    } else {
        format!("{namespace}.{}.shard{i}", q.suffix())
    }
}

/// Every quorum queue of `q` with `shards` shards per delivery class.
fn shard_names(namespace: &str, q: QueueName, shards: u16) -> Vec<String> {
    let k = if q.delivery_class().is_some() {
        shards.max(1)
    } else {
        1
    };
    (0..k).map(|i| shard_name(namespace, q, i)).collect()
}

async fn declare(conn: &Connection, namespace: &str, shards: u16) -> Result<()> {
    let ch = conn.create_channel().await?;

    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for q in QueueName::ALL {
        for (i, name) in shard_names(namespace, q, shards).into_iter().enumerate() {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            // The added shards' leaders go to the node with the fewest, so
            // that K shards spread over the cluster. (The first keeps the
            // arguments it has always been declared with: a queue
            // redeclared with others is refused.)
            if i > 0 {
                args.insert(
                    "x-queue-leader-locator".into(),
                    AMQPValue::LongString("balanced".into()),
                );
            }
            ch.queue_declare(name.into(), durable, args).await?;
        }
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

/// Watches the connection and replaces it when it drops, with backoff,
/// trying the next node first; replaces the publisher channel alone when
/// the broker closed just that.
async fn supervise(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(i) = inner.upgrade() else { return };
        let (conn_up, channel_up) = {
            let l = i.link.read().await;
            (
                l.conn.status().connected(),
                l.publisher.status().connected(),
            )
        };
        if conn_up && channel_up {
            continue;
        }
        if conn_up {
            let conn = i.link.read().await.conn.clone();
            match conn.create_channel().await {
                Ok(ch) => match ch.confirm_select(ConfirmSelectOptions::default()).await {
                    Ok(()) => {
                        i.link.write().await.publisher = ch;
                        i.generation.send_modify(|g| *g += 1);
                        tracing::warn!(connection = %i.connection_name, "publisher channel closed by the broker; reopened");
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "reopening the publisher channel failed"),
                },
                Err(e) => tracing::warn!(error = %e, "reopening the publisher channel failed"),
            }
        }
        i.connected.store(false, Ordering::Release);
        let lost = i.node.load(Ordering::Relaxed);
        tracing::warn!(connection = %i.connection_name, node = lost + 1, nodes = i.urls.len(), "broker connection lost; reconnecting");
        let mut backoff = BACKOFF_MIN;
        let mut start = (lost + 1) % i.urls.len();
        loop {
            match open_any(&i.urls, start, &i.connection_name).await {
                Ok((link, node)) => match declare(&link.conn, &i.namespace, i.shards).await {
                    Ok(()) => {
                        *i.link.write().await = link;
                        i.node.store(node, Ordering::Relaxed);
                        i.connected.store(true, Ordering::Release);
                        i.generation.send_modify(|g| *g += 1);
                        tracing::info!(connection = %i.connection_name, node = node + 1, nodes = i.urls.len(), "broker connection restored");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, node = node + 1, "declaring after reconnect failed");
                        start = (node + 1) % i.urls.len();
                    }
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

/// Whether the broker refused a publish (a quorum queue between leaders).
fn is_nack(e: &Error) -> bool {
    matches!(e, Error::Queue(m) if m.contains("(nack)"))
}

/// Whether a publish failed for a reason sending it again cannot fix (no
/// queue to route it to).
fn is_final(e: &Error) -> bool {
    matches!(e, Error::Queue(m) if m.starts_with("message returned unroutable"))
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<()> {
    let c = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| {
            Error::Queue(format!(
                "the broker did not confirm within {}s",
                CONFIRM_TIMEOUT.as_secs()
            ))
        })??;
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
        let target = self.target(queue, msg.route);
        self.publish_confirmed(
            &target,
            Some(msg.kind),
            &msg.payload,
            message_headers(None, now_ms()),
        )
        .await
    }

    async fn publish_batch(&self, queue: QueueName, msgs: Vec<OutMessage>) -> Result<()> {
        // One trace context and ready time for the whole batch.
        let headers = message_headers(None, now_ms());
        if self.inner.shards <= 1 || queue.delivery_class().is_none() {
            let all: Vec<_> = msgs
                .iter()
                .map(|m| (Some(m.kind), m.payload.as_slice()))
                .collect();
            return self.publish_all(&self.name(queue), &all, headers).await;
        }
        // Each shard's messages pipelined.
        let k = usize::from(self.inner.shards);
        let mut by_shard: Vec<Vec<(Option<&str>, &[u8])>> = vec![Vec::new(); k];
        for m in &msgs {
            let i = m
                .route
                .unwrap_or_else(|| self.inner.spread.fetch_add(1, Ordering::Relaxed))
                % k as u64;
            by_shard[i as usize].push((Some(m.kind), m.payload.as_slice()));
        }
        let by_shard = by_shard
            .into_iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(i, b)| (shard_name(&self.namespace, queue, i as u16), b));
        // The shards' batches in flight together: one confirm wait, not K.
        futures::future::try_join_all(by_shard.map(|(target, batch)| {
            let headers = headers.clone();
            async move { self.publish_all(&target, &batch, headers).await }
        }))
        .await?;
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
        // Delays end in the class's first shard: a delay tier dead-letters
        // to one queue.
        let target = self.delay_name(queue, tier);
        let ready = now_ms() + (tier * 1000) as i64;
        self.publish_confirmed(
            &target,
            Some(msg.kind),
            &msg.payload,
            message_headers(None, ready),
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
        self.publish_confirmed(
            &self.name(QueueName::Dead),
            kind,
            payload,
            message_headers(Some(h), now_ms()),
        )
        .await
    }

    async fn publish_event(&self, routing_key: &str, msg: OutMessage) -> Result<()> {
        let mut headers = message_headers(None, now_ms());
        let deadline = tokio::time::Instant::now() + PUBLISH_RETRY;
        let mut backoff = BACKOFF_MIN;
        loop {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_type(ShortString::from(msg.kind))
                .with_headers(headers.clone());
            // Not mandatory: an event nobody binds to is not an error.
            let sent = match self.link().await {
                Ok(link) => link
                    .publisher
                    .basic_publish(
                        self.events_exchange().into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &msg.payload,
                        props,
                    )
                    .await
                    .map_err(Error::from),
                Err(e) => Err(e),
            };
            let e = match sent {
                Ok(c) => match confirmed(c).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(e);
            }
            tracing::warn!(error = %e, "event not confirmed; sending again on the next connection");
            headers.insert(REPUBLISHED_HEADER.into(), AMQPValue::Boolean(true));
            if is_nack(&e) {
                self.reopen_publisher().await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<Box<dyn Consumer>> {
        let current = self.start_consumer(queue, prefetch).await?;
        Ok(Box::new(AmqpConsumer {
            queue: self.clone(),
            name: queue,
            prefetch,
            current: Some(current),
            starting: None,
        }))
    }

    async fn depths(&self) -> Result<Vec<Depth>> {
        let ch = self.link().await?.conn.create_channel().await?;
        let mut out = Vec::new();
        for q in QueueName::ALL {
            let (mut messages, mut consumers) = (0u64, 0u64);
            for name in self.queue_names(q) {
                let d = ch
                    .queue_declare(
                        name.into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                messages += u64::from(d.message_count());
                consumers += u64::from(d.consumer_count());
            }
            out.push(Depth {
                name: q,
                queue: self.name(q),
                messages,
                consumers,
            });
        }
        let _ = ch.close(200, "status".into()).await;
        Ok(out)
    }

    fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }
}

/// What one consumer of a queue holds: a channel and a consumer per shard
/// on it, and their consumer tags.
/// (The deliveries of every shard, each shard's stream ending with a `None`
/// item so that one shard's consumer cancelled is noticed, not silently
/// dropped from the merge.)
type Consuming = (
    futures::stream::SelectAll<
        futures::stream::BoxStream<'static, Option<lapin::Result<lapin::message::Delivery>>>,
    >,
    Channel,
    Vec<ShortString>,
);

impl AmqpQueue {
    /// Consumes every shard of `queue` on one channel. Quorum queues have
    /// no channel-wide prefetch: each shard's consumer gets a share of
    /// `prefetch` (twice the even share, so one busy shard does not starve
    /// the worker), never more than it.
    async fn start_consumer(&self, queue: QueueName, prefetch: u16) -> Result<Consuming> {
        let ch = self.link().await?.conn.create_channel().await?;
        match self.consume_on(&ch, queue, prefetch).await {
            Ok((streams, tags)) => Ok((streams, ch, tags)),
            Err(e) => {
                // A shard's consumer started before the failure would hold
                // its prefetch on a channel nobody reads: closing it hands
                // that back.
                let _ = ch.close(200, "consume failed".into()).await;
                Err(e)
            }
        }
    }

    async fn consume_on(
        &self,
        ch: &Channel,
        queue: QueueName,
        prefetch: u16,
    ) -> Result<(
        futures::stream::SelectAll<
            futures::stream::BoxStream<'static, Option<lapin::Result<lapin::message::Delivery>>>,
        >,
        Vec<ShortString>,
    )> {
        let names = self.queue_names(queue);
        let k = names.len() as u32;
        let share = (u32::from(prefetch) * 2)
            .div_ceil(k)
            .clamp(1, u32::from(prefetch).max(1));
        ch.basic_qos(share as u16, BasicQosOptions::default())
            .await?;
        let mut all = Vec::with_capacity(names.len());
        let mut tags = Vec::with_capacity(names.len());
        for name in names {
            let c = ch
                .basic_consume(
                    name.into(),
                    ShortString::from(format!("stampede-{}", uuid::Uuid::new_v4())),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            tags.push(c.tag());
            all.push(
                c.map(Some)
                    .chain(futures::stream::once(async { None }))
                    .boxed(),
            );
        }
        Ok((futures::stream::select_all(all), tags))
    }
}

/// A consumer that survives reconnections: when its channel goes, it waits
/// for the new connection and consumes again.
struct AmqpConsumer {
    queue: AmqpQueue,
    name: QueueName,
    prefetch: u16,
    current: Option<Consuming>,
    /// A consumer being started again, in a task of its own: `next` is
    /// raced against other work (`tokio::select!`), and a start dropped
    /// midway would leave a channel with a consumer registered that nobody
    /// reads, its prefetch of messages stuck until the connection closes
    /// (seen after a broker node's death: a whole prefetch of Follows
    /// never processed). A `next` dropped midway now leaves the task
    /// running; the next call takes up its result.
    starting: Option<tokio::task::JoinHandle<Result<Consuming>>>,
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
        let (current, starting) = (self.current.take(), self.starting.take());
        if current.is_none() && starting.is_none() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some((consumer, ch, _)) = current {
                    let _ = ch.close(200, "consumer closed".into()).await;
                    drop(consumer);
                }
                if let Some(Ok(Ok((consumer, ch, _)))) = match starting {
                    Some(h) => Some(h.await),
                    None => None,
                } {
                    let _ = ch.close(200, "consumer closed".into()).await;
                    drop(consumer);
                }
            });
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Result<Incoming>> {
        let d = loop {
            let Some((consumer, _, _)) = self.current.as_mut() else {
                let starting = self.starting.get_or_insert_with(|| {
                    let (q, name, prefetch) = (self.queue.clone(), self.name, self.prefetch);
                    tokio::spawn(async move { q.start_consumer(name, prefetch).await })
                });
                let started = starting.await;
                self.starting = None;
                match started {
                    Ok(Ok(c)) => {
                        tracing::info!(queue = self.name.suffix(), "consuming again");
                        self.current = Some(c);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(queue = self.name.suffix(), error = %e, "cannot consume yet");
                        tokio::time::sleep(BACKOFF_MAX / 5).await;
                    }
                    Err(e) => {
                        tracing::warn!(queue = self.name.suffix(), error = %e, "starting the consumer failed");
                        tokio::time::sleep(BACKOFF_MAX / 5).await;
                    }
                }
                continue;
            };
            match consumer.next().await {
                Some(Some(Ok(d))) => break d,
                Some(Some(Err(e))) => {
                    tracing::warn!(queue = self.name.suffix(), error = %e, "consumer lost; resuming after reconnection");
                }
                // One shard's consumer ended (cancelled by the broker, or
                // its channel gone): all are started again, on a new
                // channel (what this one held goes back to the queue).
                Some(None) | None => {
                    tracing::warn!(queue = self.name.suffix(), "consumer cancelled; resuming");
                }
            }
            // The channel is closed (if it is not already), handing back
            // what it held, before the consumers are dropped (see Drop).
            if let Some((streams, ch, _)) = self.current.take() {
                tokio::spawn(async move {
                    let _ = ch.close(200, "resuming".into()).await;
                    drop(streams);
                });
            }
        };
        Some(Ok(Incoming {
            queue: self.name,
            kind: d.properties.kind().as_ref().map(|k| k.as_str().to_string()),
            redelivered: d.redelivered || republished(&d.properties),
            payload: Bytes::from(d.data),
            ready_unix_ms: ready_ms(&d.properties),
            traceparent: traceparent(&d.properties),
            dead: dead_info(&d.properties),
            acker: Box::new(AmqpAcker(d.acker)),
        }))
    }

    /// Cancels the consumers and waits for the broker's `cancel-ok` before
    /// closing the channel: closed at once, RabbitMQ 3.10 could hand back a
    /// quorum queue's message acknowledged just before (its settlement
    /// applied after the close returned the channel's messages), and a
    /// stopping worker would see it delivered again. Bounded: a broker that
    /// does not answer leaves the rest to the channel's close.
    async fn close(mut self: Box<Self>) {
        let Some((streams, ch, tags)) = self.current.take() else {
            return;
        };
        let cancel = async {
            for tag in tags {
                if ch
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, cancel).await;
        let _ = tokio::time::timeout(CLOSE_WAIT, ch.close(200, "consumer closed".into())).await;
        drop(streams);
    }
}

/// How long a consumer's close waits for each of the broker's answers.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

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

/// Whether the message was published again after a lost confirm.
fn republished(props: &BasicProperties) -> bool {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(REPUBLISHED_HEADER))
        .is_some_and(|v| matches!(v, AMQPValue::Boolean(true)))
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

    /// Delivery tags are per channel: this acknowledges the messages this
    /// consumer's channel received up to this one (a consumer that resumed
    /// on a new channel lost the earlier ones back to the queue anyway).
    async fn ack_multiple(&self) -> Result<()> {
        self.0.ack(BasicAckOptions { multiple: true }).await?;
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
