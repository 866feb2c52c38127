//! The embedded queue: the same [`Queue`] as RabbitMQ, inside the process,
//! durable in a SQLite file (`queue.db`) in the data directory.
//!
//! Every message is a row, written (group-committed) before `publish`
//! returns and deleted when it is acknowledged; a delayed message keeps its
//! due time as a row column, so retries and their delays survive a restart.
//! In memory each queue holds the ready messages in order and the delayed
//! ones in a heap by due time; consumers wait on a notification, never poll.
//! At start every stored row is loaded back, flagged redelivered (a crash
//! may have interrupted its handling), which is what makes kill -9 lose
//! nothing: whatever was not acknowledged is handed out again.
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::params;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::clock::now_ms;
use crate::queue::{Acker, Consumer, DeadInfo, Depth, Incoming, OutMessage, Queue, QueueName};
use crate::sqlite::{DataDirLock, Db};
use crate::{Error, Result};

const SCHEMA: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE messages (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        queue   TEXT NOT NULL,
        kind    TEXT,
        payload BLOB NOT NULL,
        due_at  INTEGER NOT NULL,
        reason  TEXT,
        source  TEXT
    )",
    ),
    (
        2,
        "ALTER TABLE messages ADD COLUMN ready_at INTEGER;
     ALTER TABLE messages ADD COLUMN traceparent TEXT",
    ),
];

/// The routing key of verified activities bound to the application's queue.
const ACCEPTED: &str = "accepted";

#[derive(Debug, Clone)]
struct Msg {
    id: i64,
    kind: Option<String>,
    payload: Bytes,
    redelivered: bool,
    dead: Option<DeadInfo>,
    ready_ms: i64,
    traceparent: Option<String>,
}

#[derive(Debug)]
struct Delayed {
    due: i64,
    msg: Msg,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.msg.id) == (other.due, other.msg.id)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.msg.id).cmp(&(other.due, other.msg.id))
    }
}

#[derive(Default)]
struct LaneState {
    ready: VecDeque<Msg>,
    delayed: BinaryHeap<Reverse<Delayed>>,
}

impl LaneState {
    /// Moves due messages to the ready list.
    fn promote(&mut self, now: i64) {
        while self.delayed.peek().is_some_and(|d| d.0.due <= now) {
            if let Some(Reverse(d)) = self.delayed.pop() {
                self.ready.push_back(d.msg);
            }
        }
    }
}

#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
    notify: Notify,
    consumers: AtomicU64,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // A panic while holding the lock leaves plain data; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, msg: Msg, due: i64) {
        {
            let mut st = self.lock();
            if due <= now_ms() {
                st.ready.push_back(msg);
            } else {
                st.delayed.push(Reverse(Delayed { due, msg }));
            }
        }
        self.notify.notify_waiters();
    }

    fn give_back(&self, mut msg: Msg) {
        msg.redelivered = true;
        self.lock().ready.push_front(msg);
        self.notify.notify_waiters();
    }
}

struct Inner {
    db: Db,
    namespace: String,
    lanes: [Lane; QueueName::ALL.len()],
}

fn lane_index(q: QueueName) -> usize {
    match q {
        QueueName::Fanout => 0,
        QueueName::Delivery => 1,
        QueueName::Dead => 2,
        QueueName::Inbound => 3,
        QueueName::App => 4,
        QueueName::DeliveryInteractive => 5,
        QueueName::DeliveryBulk => 6,
    }
}

fn queue_by_suffix(s: &str) -> Option<QueueName> {
    QueueName::ALL.into_iter().find(|q| q.suffix() == s)
}

/// A row to write.
struct NewRow {
    queue: QueueName,
    kind: Option<String>,
    payload: Vec<u8>,
    due: i64,
    dead: Option<DeadInfo>,
    ready: i64,
    traceparent: Option<String>,
}

/// The embedded implementation of [`Queue`].
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

impl EmbeddedQueue {
    /// Opens (creating) the queue in the locked data directory and loads the
    /// messages a previous run left.
    pub async fn open(lock: &DataDirLock, namespace: &str) -> Result<Self> {
        let db = Db::open(lock, "queue.db", SCHEMA)?;
        let rows = db
            .call(|c| {
                let mut s = c.prepare(
                    "SELECT id, queue, kind, payload, due_at, reason, source, ready_at, traceparent
                     FROM messages ORDER BY id",
                )?;
                let rows = s
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<String>>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, Option<String>>(5)?,
                            r.get::<_, Option<String>>(6)?,
                            r.get::<_, Option<i64>>(7)?,
                            r.get::<_, Option<String>>(8)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await?;
        let q = Self {
            inner: Arc::new(Inner {
                db,
                namespace: namespace.to_string(),
                lanes: Default::default(),
            }),
        };
        let loaded = rows.len();
        for (id, queue, kind, payload, due, reason, source, ready, traceparent) in rows {
            let Some(name) = queue_by_suffix(&queue) else {
                tracing::warn!(id, queue, "stored message for an unknown queue left alone");
                continue;
            };
            let dead = reason.map(|reason| DeadInfo {
                reason,
                source: source.unwrap_or_default(),
            });
            q.lane(name).push(
                Msg {
                    id,
                    kind,
                    payload: Bytes::from(payload),
                    redelivered: true,
                    dead,
                    ready_ms: ready.unwrap_or(due),
                    traceparent,
                },
                due,
            );
        }
        if loaded > 0 {
            tracing::info!(messages = loaded, "embedded queue restored");
        }
        Ok(q)
    }

    fn lane(&self, q: QueueName) -> &Lane {
        &self.inner.lanes[lane_index(q)]
    }

    fn full_name(&self, q: QueueName) -> String {
        format!("{}.{}", self.inner.namespace, q.suffix())
    }

    /// Writes rows durably, then makes them visible to consumers.
    async fn write(&self, rows: Vec<NewRow>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write_and_delete(rows, None).await
    }

    /// Writes rows and deletes message `delete` in one durable transaction,
    /// then makes the rows visible to consumers.
    async fn write_and_delete(&self, rows: Vec<NewRow>, delete: Option<i64>) -> Result<()> {
        let (ids, rows) = self
            .inner
            .db
            .call(move |c| {
                if let Some(id) = delete {
                    delete_message(c, id)?;
                }
                let mut s = c.prepare_cached(
                    "INSERT INTO messages (queue, kind, payload, due_at, reason, source, ready_at, traceparent)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                let mut ids = Vec::with_capacity(rows.len());
                for r in &rows {
                    let (reason, source) = match &r.dead {
                        Some(d) => (Some(d.reason.as_str()), Some(d.source.as_str())),
                        None => (None, None),
                    };
                    s.execute(params![
                        r.queue.suffix(),
                        r.kind,
                        r.payload,
                        r.due,
                        reason,
                        source,
                        r.ready,
                        r.traceparent
                    ])?;
                    ids.push(c.last_insert_rowid());
                }
                Ok((ids, rows))
            })
            .await?;
        for (id, r) in ids.into_iter().zip(rows) {
            self.lane(r.queue).push(
                Msg {
                    id,
                    kind: r.kind,
                    payload: Bytes::from(r.payload),
                    redelivered: false,
                    dead: r.dead,
                    ready_ms: r.ready,
                    traceparent: r.traceparent,
                },
                r.due,
            );
        }
        Ok(())
    }

    fn row(queue: QueueName, msg: OutMessage, due: i64, traceparent: Option<String>) -> NewRow {
        NewRow {
            queue,
            kind: Some(msg.kind.to_string()),
            payload: msg.payload,
            due,
            dead: None,
            ready: due.max(now_ms()),
            traceparent,
        }
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn publish(&self, queue: QueueName, msg: OutMessage) -> Result<()> {
        let tp = crate::trace::current_traceparent();
        self.write(vec![Self::row(queue, msg, 0, tp)]).await
    }

    async fn publish_batch(&self, queue: QueueName, msgs: Vec<OutMessage>) -> Result<()> {
        // One trace context for the whole batch.
        let tp = crate::trace::current_traceparent();
        self.write(
            msgs.into_iter()
                .map(|m| Self::row(queue, m, 0, tp.clone()))
                .collect(),
        )
        .await
    }

    async fn publish_delayed(
        &self,
        queue: QueueName,
        msg: OutMessage,
        delay: Duration,
    ) -> Result<Duration> {
        let due = now_ms().saturating_add(delay.as_millis() as i64);
        let tp = crate::trace::current_traceparent();
        self.write(vec![Self::row(queue, msg, due, tp)]).await?;
        Ok(delay)
    }

    async fn dead_letter(
        &self,
        from: QueueName,
        kind: Option<&str>,
        payload: &[u8],
        reason: &str,
    ) -> Result<()> {
        self.write(vec![NewRow {
            queue: QueueName::Dead,
            kind: kind.map(str::to_string),
            payload: payload.to_vec(),
            due: 0,
            ready: now_ms(),
            traceparent: crate::trace::current_traceparent(),
            dead: Some(DeadInfo {
                reason: reason.to_string(),
                source: self.full_name(from),
            }),
        }])
        .await
    }

    async fn publish_event(&self, routing_key: &str, msg: OutMessage) -> Result<()> {
        // The application's queue is bound to `accepted`; other verdicts
        // have no subscriber in the embedded layout.
        if routing_key == ACCEPTED {
            self.publish(QueueName::App, msg).await
        } else {
            Ok(())
        }
    }

    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<Box<dyn Consumer>> {
        self.lane(queue).consumers.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(EmbeddedConsumer {
            queue: self.clone(),
            name: queue,
            permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
            outstanding: Arc::default(),
            handed_out: 0,
        }))
    }

    async fn depths(&self) -> Result<Vec<Depth>> {
        let now = now_ms();
        Ok(QueueName::ALL
            .into_iter()
            .map(|q| {
                let lane = self.lane(q);
                // A delayed message whose delay has ended is ready, whether
                // or not a consumer has looked since (as on RabbitMQ).
                let ready = {
                    let mut st = lane.lock();
                    st.promote(now);
                    st.ready.len() as u64
                };
                Depth {
                    name: q,
                    queue: self.full_name(q),
                    messages: ready,
                    consumers: lane.consumers.load(Ordering::Relaxed),
                }
            })
            .collect())
    }

    /// False while its file's commits fail (a full disk): nothing can be
    /// enqueued, so the process is not ready.
    fn is_connected(&self) -> bool {
        self.inner.db.failing().is_none()
    }
}

/// The messages a consumer handed out and has not settled, by the order
/// it handed them out (what `ack_multiple` settles up to), each with its
/// prefetch permit.
type Outstanding = Arc<Mutex<BTreeMap<u64, (Msg, OwnedSemaphorePermit)>>>;

struct EmbeddedConsumer {
    queue: EmbeddedQueue,
    name: QueueName,
    permits: Arc<Semaphore>,
    outstanding: Outstanding,
    handed_out: u64,
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.queue
            .lane(self.name)
            .consumers
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn next(&mut self) -> Option<Result<Incoming>> {
        // At most `prefetch` unsettled messages per consumer.
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let lane = self.queue.lane(self.name);
        loop {
            let notified = lane.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_due = {
                let mut st = lane.lock();
                st.promote(now_ms());
                if let Some(msg) = st.ready.pop_front() {
                    self.handed_out += 1;
                    let seq = self.handed_out;
                    let incoming = Incoming {
                        queue: self.name,
                        kind: msg.kind.clone(),
                        payload: msg.payload.clone(),
                        redelivered: msg.redelivered,
                        ready_unix_ms: Some(msg.ready_ms),
                        traceparent: msg.traceparent.clone(),
                        dead: msg.dead.clone(),
                        acker: Box::new(EmbeddedAcker {
                            queue: self.queue.clone(),
                            name: self.name,
                            seq,
                            outstanding: self.outstanding.clone(),
                        }),
                    };
                    lock(&self.outstanding).insert(seq, (msg, permit));
                    return Some(Ok(incoming));
                }
                st.delayed.peek().map(|d| d.0.due)
            };
            match next_due {
                Some(due) => {
                    let wait = Duration::from_millis(due.saturating_sub(now_ms()).max(1) as u64);
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// Removes a settled message's row.
fn delete_message(c: &rusqlite::Connection, id: i64) -> Result<()> {
    c.prepare_cached("DELETE FROM messages WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

struct EmbeddedAcker {
    queue: EmbeddedQueue,
    name: QueueName,
    /// Its place in its consumer's [`Outstanding`].
    seq: u64,
    outstanding: Outstanding,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EmbeddedAcker {
    fn take(&self) -> Option<(Msg, OwnedSemaphorePermit)> {
        lock(&self.outstanding).remove(&self.seq)
    }
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<()> {
        let Some((msg, _permit)) = self.take() else {
            return Err(Error::Queue("message already settled".into()));
        };
        let id = msg.id;
        // Not awaited: the message's effect is already durable, so a delete
        // lost to a crash only hands the message out again after restart,
        // marked redelivered (as RabbitMQ does with an ack it never got).
        self.queue
            .inner
            .db
            .call_detached("queue acknowledgement", move |c| delete_message(c, id));
        Ok(())
    }

    /// Every message of the consumer up to this one, deleted by one
    /// statement each in one transaction, not awaited (as `ack`).
    async fn ack_multiple(&self) -> Result<()> {
        let settled = {
            let mut held = lock(&self.outstanding);
            if !held.contains_key(&self.seq) {
                return Err(Error::Queue("message already settled".into()));
            }
            let later = held.split_off(&(self.seq + 1));
            std::mem::replace(&mut *held, later)
        };
        let ids: Vec<i64> = settled.values().map(|(m, _)| m.id).collect();
        drop(settled);
        self.queue
            .inner
            .db
            .call_detached("queue acknowledgement", move |c| {
                ids.iter().try_for_each(|&id| delete_message(c, id))
            });
        Ok(())
    }

    async fn requeue(&self) -> Result<()> {
        let Some((msg, _permit)) = self.take() else {
            return Err(Error::Queue("message already settled".into()));
        };
        self.queue.lane(self.name).give_back(msg);
        Ok(())
    }

    /// The event's row and this message's deletion in one transaction: one
    /// durable commit instead of two writes, and never one without the other.
    async fn ack_with_event(
        &self,
        queue: &dyn Queue,
        routing_key: &str,
        event: OutMessage,
    ) -> Result<()> {
        if routing_key != ACCEPTED {
            queue.publish_event(routing_key, event).await?;
            return self.ack().await;
        }
        let Some((msg, _permit)) = self.take() else {
            return Err(Error::Queue("message already settled".into()));
        };
        let tp = crate::trace::current_traceparent();
        let row = EmbeddedQueue::row(QueueName::App, event, 0, tp);
        match self.queue.write_and_delete(vec![row], Some(msg.id)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Neither happened: the message is still stored; hand it out again.
                self.queue.lane(self.name).give_back(msg);
                Err(e)
            }
        }
    }
}

impl Drop for EmbeddedAcker {
    /// A message dropped unsettled (an aborted task) goes back to the queue,
    /// as an unacknowledged AMQP message does when its channel closes.
    fn drop(&mut self) {
        if let Some((msg, _permit)) = self.take() {
            self.queue.lane(self.name).give_back(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(p: &str) -> OutMessage {
        OutMessage {
            kind: "t.Msg",
            payload: p.as_bytes().to_vec(),
            route: None,
        }
    }

    async fn payload(c: &mut Box<dyn Consumer>) -> Incoming {
        tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn unacknowledged_and_delayed_messages_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("stampede-q-{}", uuid::Uuid::new_v4()));
        {
            let lock = DataDirLock::acquire(&dir).unwrap();
            let q = EmbeddedQueue::open(&lock, "t").await.unwrap();
            q.publish_batch(QueueName::Delivery, vec![msg("a"), msg("b")])
                .await
                .unwrap();
            q.publish_delayed(
                QueueName::Delivery,
                msg("later"),
                Duration::from_millis(1500),
            )
            .await
            .unwrap();
            let mut c = q.consume(QueueName::Delivery, 1).await.unwrap();
            let a = payload(&mut c).await;
            assert_eq!(&a.payload[..], b"a");
            assert!(!a.redelivered);
            a.acker.ack().await.unwrap();
            let b = payload(&mut c).await;
            assert_eq!(&b.payload[..], b"b");
            // "b" is never acknowledged: the process "dies" holding it
            // (its row stays; only memory would have handed it out again).
            drop(b);
        }
        let lock = DataDirLock::acquire(&dir).unwrap();
        let q = EmbeddedQueue::open(&lock, "t").await.unwrap();
        let mut c = q.consume(QueueName::Delivery, 10).await.unwrap();
        let b = payload(&mut c).await;
        assert_eq!(&b.payload[..], b"b");
        assert!(b.redelivered);
        b.acker.ack().await.unwrap();
        let started = std::time::Instant::now();
        let later = payload(&mut c).await;
        assert_eq!(&later.payload[..], b"later");
        assert!(started.elapsed() > Duration::from_millis(500));
        later.acker.ack().await.unwrap();
        drop((c, q, lock));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_event_published_with_the_ack_survives_a_restart_and_the_message_does_not() {
        let dir = std::env::temp_dir().join(format!("stampede-q-{}", uuid::Uuid::new_v4()));
        {
            let lock = DataDirLock::acquire(&dir).unwrap();
            let q = EmbeddedQueue::open(&lock, "t").await.unwrap();
            q.publish(QueueName::Inbound, msg("in")).await.unwrap();
            let mut c = q.consume(QueueName::Inbound, 1).await.unwrap();
            let m = payload(&mut c).await;
            m.acker
                .ack_with_event(&q, ACCEPTED, msg("verified"))
                .await
                .unwrap();
            assert!(matches!(m.acker.ack().await, Err(Error::Queue(_))));
        }
        let lock = DataDirLock::acquire(&dir).unwrap();
        let q = EmbeddedQueue::open(&lock, "t").await.unwrap();
        let mut app = q.consume(QueueName::App, 1).await.unwrap();
        let event = payload(&mut app).await;
        assert_eq!(&event.payload[..], b"verified");
        let depths = q.depths().await.unwrap();
        let inbound = depths.iter().find(|d| d.queue == "t.inbound").unwrap();
        assert_eq!(inbound.messages, 0, "the acknowledged message is gone");
        drop((app, q, lock));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn requeued_and_dropped_messages_come_back_and_dead_letters_keep_their_reason() {
        let dir = std::env::temp_dir().join(format!("stampede-q-{}", uuid::Uuid::new_v4()));
        let lock = DataDirLock::acquire(&dir).unwrap();
        let q = EmbeddedQueue::open(&lock, "t").await.unwrap();
        q.publish(QueueName::Fanout, msg("x")).await.unwrap();
        let mut c = q.consume(QueueName::Fanout, 4).await.unwrap();
        let x = payload(&mut c).await;
        x.acker.requeue().await.unwrap();
        let x = payload(&mut c).await;
        assert!(x.redelivered);
        drop(x);
        let x = payload(&mut c).await;
        q.dead_letter(QueueName::Fanout, x.kind.as_deref(), &x.payload, "bad")
            .await
            .unwrap();
        x.acker.ack().await.unwrap();
        let mut d = q.consume(QueueName::Dead, 1).await.unwrap();
        let dead = payload(&mut d).await;
        assert_eq!(
            dead.dead,
            Some(DeadInfo {
                reason: "bad".into(),
                source: "t.fanout".into()
            })
        );
        q.publish_event("rejected", msg("no")).await.unwrap();
        q.publish_event(ACCEPTED, msg("yes")).await.unwrap();
        let depths = q.depths().await.unwrap();
        let app = depths.iter().find(|d| d.queue == "t.app").unwrap();
        assert_eq!(app.messages, 1);
        drop((c, d, dead, q, lock));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
