//! The consume loop shared by queue-driven services: up to `prefetch`
//! messages handled at once, a poisoned message moved to the dead-letter
//! queue with its reason (never a crash, never a loop), and a graceful stop
//! that finishes in-flight messages within a grace period; messages still
//! unacknowledged then go back to the queue when the channel closes.
//!
//! [`consume_weighted`] does the same over several queues at once (the
//! delivery classes): one concurrency budget, shared by weight.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::Result;
use stampede_backends::queue::{Consumer, Incoming, Queue, QueueName};

/// How long the first queue's next message of [`consume_weighted`] waits
/// for a place in a full budget before it takes one beyond it.
const FIRST_HELD: Duration = Duration::from_millis(50);

/// How long a stopping worker waits for in-flight messages.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// The loop of [`consume`]: `queue` until `shutdown`, calling `handle` for
/// every message. `handle` owns the message and settles it.
async fn consume_loop<H, F>(
    q: Arc<dyn Queue>,
    queue: QueueName,
    prefetch: u16,
    shutdown: CancellationToken,
    handle: H,
) -> Result<()>
where
    H: Fn(Incoming) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut consumer = q.consume(queue, prefetch).await?;
    let mut tasks = JoinSet::new();
    let limit = usize::from(prefetch.max(1));
    tracing::info!(queue = queue.suffix(), prefetch, "consuming");
    loop {
        while tasks.len() >= limit {
            let _ = tasks.join_next().await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(msg)) => {
                    tasks.spawn(handle(msg));
                }
                Some(Err(e)) => {
                    tracing::error!(queue = queue.suffix(), error = %e, "consumer failed");
                    break;
                }
                None => {
                    tracing::warn!(queue = queue.suffix(), "consumer ended");
                    break;
                }
            }
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            queue = queue.suffix(),
            left = tasks.len(),
            "in-flight messages returned to the queue"
        );
        tasks.abort_all();
    }
    // After the last acknowledgement (see Consumer::close).
    consumer.close().await;
    Ok(())
}

/// Stride scheduling over classes of work (Waldspurger and Weihl, 1995):
/// each class has a pass that grows by `1/weight` every time one of its
/// messages starts, and the next start goes to the class with work whose
/// pass is lowest. Under a backlog in every class, starts follow the
/// weights exactly (6:3:1 gives 60 %, 30 %, 10 %); a class with no work is
/// skipped, so its share goes to the others (work-conserving); and a class
/// coming back from idle is moved up to the current pass, so it banks no
/// credit for the time it had nothing to do and cannot then take every slot
/// in a burst.
#[derive(Debug, Clone)]
pub struct WeightedPicker {
    stride: Vec<u64>,
    pass: Vec<u64>,
    /// The pass of the last class picked: the scheduler's virtual time.
    now: u64,
}

impl WeightedPicker {
    /// A picker over classes of these weights (0 counts as 1), in order of
    /// priority: ties go to the earlier class.
    pub fn new(weights: &[u32]) -> Self {
        // Strides in units of the weights' least common multiple are exact:
        // no rounding drifts a class off its share.
        let weights: Vec<u64> = weights.iter().map(|w| u64::from((*w).max(1))).collect();
        let lcm = weights
            .iter()
            .try_fold(1u64, |l, w| (l / gcd(l, *w)).checked_mul(*w))
            .filter(|l| *l <= 1 << 40)
            .unwrap_or(1 << 40);
        Self {
            stride: weights.iter().map(|w| (lcm / w).max(1)).collect(),
            pass: vec![0; weights.len()],
            now: 0,
        }
    }

    /// The class whose message starts next among those `has_work` says
    /// have one; `None` when none has.
    pub fn pick(&mut self, has_work: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..self.pass.len() {
            if !has_work(i) {
                continue;
            }
            // Back from idle: no credit for the time without work.
            self.pass[i] = self.pass[i].max(self.now);
            if best.is_none_or(|b| self.pass[i] < self.pass[b]) {
                best = Some(i);
            }
        }
        let i = best?;
        self.now = self.pass[i];
        self.pass[i] += self.stride[i];
        Some(i)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Takes messages from one consumer for [`weighted_loop`] (at most
/// `prefetch` ahead of the loop, as the broker allows), until
/// `stop`; returns the consumer, so that it is dropped (its channel closed,
/// what it holds unacknowledged returned) only once the work it handed out
/// is settled.
async fn pump(
    mut consumer: Box<dyn Consumer>,
    tx: mpsc::Sender<Result<Incoming>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) -> Box<dyn Consumer> {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return consumer,
            next = consumer.next() => next,
        };
        let Some(item) = next else {
            // Ended: the loop sees the channel closed.
            drop(tx);
            wake.notify_one();
            return consumer;
        };
        let failed = item.is_err();
        tokio::select! {
            // A message not handed over goes back: the embedded queue's on
            // drop, a broker's when the channel closes.
            _ = stop.cancelled() => return consumer,
            sent = tx.send(item.map_err(Into::into)) => if sent.is_err() {
                return consumer;
            },
        }
        wake.notify_one();
        if failed {
            return consumer;
        }
    }
}

/// The loop of [`consume_weighted`]: every queue of `classes` until
/// `shutdown`, at most `prefetch` messages handled at once in all, the next
/// to start chosen by [`WeightedPicker`] among the queues that have one
/// waiting. Each queue's consumer has a broker prefetch of `prefetch`, so
/// a class alone can use the whole budget.
async fn weighted_loop<H, F>(
    q: Arc<dyn Queue>,
    classes: &[(QueueName, u32)],
    prefetch: u16,
    shutdown: CancellationToken,
    handle: H,
) -> Result<()>
where
    H: Fn(Incoming) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let limit = usize::from(prefetch.max(1));
    // Places beyond `limit` only the first queue's messages may take.
    let first_extra = (limit / 8).max(1);
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let mut pumps = Vec::with_capacity(classes.len());
    let mut inbox = Vec::with_capacity(classes.len());
    for (name, _) in classes {
        let consumer = match q.consume(*name, prefetch).await {
            Ok(c) => c,
            Err(e) => {
                stop.cancel();
                return Err(e.into());
            }
        };
        // Up to `prefetch` taken ahead per queue (what the broker lets the
        // consumer hold anyway): a class's backlog shows to the picker even
        // while its pump waits to be scheduled.
        let (tx, rx) = mpsc::channel(limit);
        pumps.push(tokio::spawn(pump(consumer, tx, wake.clone(), stop.clone())));
        inbox.push(rx);
    }
    let names: Vec<&str> = classes.iter().map(|(q, _)| q.suffix()).collect();
    let weights: Vec<u32> = classes.iter().map(|(_, w)| *w).collect();
    tracing::info!(queues = ?names, ?weights, prefetch, "consuming by weight");
    let mut picker = WeightedPicker::new(&weights);
    let mut heads: Vec<Option<Incoming>> = classes.iter().map(|_| None).collect();
    let mut tasks = JoinSet::new();
    // Since when the first queue's next message has waited to start.
    let mut first_since: Option<std::time::Instant> = None;
    'consume: loop {
        if heads[0].is_none() {
            first_since = None;
        }
        for (i, rx) in inbox.iter_mut().enumerate() {
            if heads[i].is_some() {
                continue;
            }
            match rx.try_recv() {
                Ok(Ok(msg)) => {
                    if i == 0 {
                        first_since = Some(std::time::Instant::now());
                    }
                    heads[i] = Some(msg)
                }
                Ok(Err(e)) => {
                    tracing::error!(queue = names[i], error = %e, "consumer failed");
                    break 'consume;
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    tracing::warn!(queue = names[i], "consumer ended");
                    break 'consume;
                }
            }
        }
        if tasks.len() < limit {
            if let Some(msg) = picker
                .pick(|i| heads[i].is_some())
                .and_then(|i| heads[i].take())
            {
                tasks.spawn(handle(msg));
                continue;
            }
        } else if tasks.len() < limit + first_extra
            && first_since.is_some_and(|t| t.elapsed() >= FIRST_HELD)
        {
            // The first queue (delivery's interactive class) is not held
            // back for long by the others filling the budget: it has a few
            // places of its own beyond it.
            if let Some(msg) = heads[0].take() {
                tasks.spawn(handle(msg));
                continue;
            }
        }
        let first_due = first_since.map(|t| tokio::time::Instant::from_std(t) + FIRST_HELD);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(first_due.unwrap_or_else(tokio::time::Instant::now)), if first_due.is_some() && tasks.len() >= limit => {}
        }
    }
    stop.cancel();
    // Taken but not started: back to their queues now.
    for rx in &mut inbox {
        rx.close();
        while let Ok(Ok(msg)) = rx.try_recv() {
            let _ = msg.acker.requeue().await;
        }
    }
    for msg in heads.into_iter().flatten() {
        let _ = msg.acker.requeue().await;
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            queues = ?names,
            left = tasks.len(),
            "in-flight messages returned to the queue"
        );
        tasks.abort_all();
    }
    for p in pumps {
        // The consumer comes back and is closed here, after the drain.
        if let Ok(c) = p.await {
            c.close().await;
        }
    }
    Ok(())
}

/// Consumes every queue of `classes` (a queue and its weight, in priority
/// order) for the process until its shutdown, handing every message to
/// `handler`: at most `prefetch` in progress in all, started by weight
/// among the queues that have messages waiting (see [`WeightedPicker`]),
/// and the first queue's messages beyond that, up to an eighth of
/// `prefetch` more (at least one), once one has waited 50 ms for a place
/// the others fill.
pub async fn consume_weighted<H: Handler>(
    p: &crate::process::Process,
    classes: &[(QueueName, u32)],
    prefetch: u16,
    handler: H,
) -> Result<()> {
    let metrics = p.metrics.clone();
    weighted_loop(
        p.backends.queue.clone(),
        classes,
        prefetch,
        p.shutdown.clone(),
        move |msg| instrumented(&metrics, &handler, msg),
    )
    .await
}

/// `handler` on `msg`, counted (the queue's consumption and head age) and
/// in a span of its own, a child of the span that published it.
fn instrumented<H: Handler>(
    metrics: &Metrics,
    handler: &H,
    msg: Incoming,
) -> impl Future<Output = ()> + Send + 'static {
    let queue = msg.queue;
    metrics.queue_age(queue.suffix(), msg.ready_unix_ms);
    let span = tracing::info_span!(
        "consume",
        queue = queue.suffix(),
        redelivered = msg.redelivered
    );
    crate::telemetry::set_parent(&span, msg.traceparent.as_deref());
    let h = handler.clone();
    tracing::Instrument::instrument(async move { h.handle(msg).await }, span)
}

/// A queue-driven service: it settles every message it is handed.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Processes and settles one message.
    fn handle(&self, msg: Incoming) -> impl Future<Output = ()> + Send;
}

/// Consumes `queue` for the process until its shutdown, handing every
/// message to `handler`.
pub async fn consume<H: Handler>(
    p: &crate::process::Process,
    queue: QueueName,
    prefetch: u16,
    handler: H,
) -> Result<()> {
    let metrics = p.metrics.clone();
    consume_loop(
        p.backends.queue.clone(),
        queue,
        prefetch,
        p.shutdown.clone(),
        move |msg| instrumented(&metrics, &handler, msg),
    )
    .await
}

/// Moves a message that cannot be processed to the dead-letter queue with
/// `reason`, then acknowledges it. Should the dead-letter publish fail, the
/// message goes back to its queue instead of being lost.
pub async fn poison(
    q: &dyn Queue,
    metrics: &Metrics,
    from: QueueName,
    msg: Incoming,
    reason: &str,
) {
    metrics
        .poisoned
        .get_or_create(&[("queue", from.suffix())])
        .inc();
    tracing::warn!(
        queue = from.suffix(),
        reason,
        "poisoned message dead-lettered"
    );
    match q
        .dead_letter(from, msg.kind.as_deref(), &msg.payload, reason)
        .await
    {
        Ok(()) => {
            if let Err(e) = msg.acker.ack().await {
                tracing::warn!(error = %e, "ack after dead-letter failed");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "dead-letter publish failed; returning message");
            let _ = msg.acker.requeue().await;
        }
    }
}

/// Decodes a protobuf queue message after checking its `type` property.
pub fn decode<M: prost::Message + Default>(msg: &Incoming, kind: &str) -> Result<M, String> {
    match msg.kind.as_deref() {
        Some(k) if k == kind => {}
        Some(k) => return Err(format!("unexpected message type `{k}`, expected `{kind}`")),
        None => return Err(format!("message has no type, expected `{kind}`")),
    }
    M::decode(msg.payload.as_ref()).map_err(|e| format!("cannot decode {kind}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(p: &mut WeightedPicker, n: usize, has_work: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut counts = vec![0; 3];
        for _ in 0..n {
            if let Some(i) = p.pick(&has_work) {
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn under_a_backlog_everywhere_starts_follow_the_weights() {
        let mut p = WeightedPicker::new(&[6, 3, 1]);
        assert_eq!(starts(&mut p, 10_000, |_| true), [6000, 3000, 1000]);
        // And in any short window too, not only on average.
        let c = starts(&mut p, 20, |_| true);
        assert_eq!(c, [12, 6, 2]);
        let mut p = WeightedPicker::new(&[1, 1, 1]);
        assert_eq!(starts(&mut p, 300, |_| true), [100, 100, 100]);
    }

    #[test]
    fn an_idle_class_share_goes_to_the_others() {
        let mut p = WeightedPicker::new(&[6, 3, 1]);
        assert_eq!(starts(&mut p, 1000, |i| i == 2), [0, 0, 1000]);
        let c = starts(&mut p, 900, |i| i != 0);
        assert!(c[0] == 0 && c[1].abs_diff(675) <= 1, "{c:?}");
        assert_eq!(p.pick(|_| false), None);
    }

    #[test]
    fn a_class_back_from_idle_gets_its_share_not_a_burst() {
        let mut p = WeightedPicker::new(&[6, 3, 1]);
        starts(&mut p, 5000, |i| i == 2);
        // Interactive and normal come back after 5,000 bulk starts: they get
        // their 60 % and 30 % from now on, not the 5,000 starts they missed;
        // bulk, which just started one, waits a turn of its 10 % and no more.
        let c = starts(&mut p, 12, |_| true);
        assert_eq!(c, [7, 4, 1]);
        let c = starts(&mut p, 1000, |_| true);
        for (got, want) in c.iter().zip([600, 300, 100]) {
            assert!(got.abs_diff(want) <= 1, "{c:?}");
        }
    }

    /// The loop itself on the embedded queue: one budget for all three
    /// queues, starts by weight while all have a backlog, and every message
    /// handled once the others run dry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_weighted_loop_shares_one_budget_by_weight() {
        use stampede_backends::queue::embedded::EmbeddedQueue;
        use stampede_backends::queue::OutMessage;
        use stampede_backends::sqlite::DataDirLock;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        let dir = std::env::temp_dir().join(format!(
            "stampede-weighted-{}-{}",
            std::process::id(),
            stampede_backends::clock::now_ms()
        ));
        let lock = DataDirLock::acquire(&dir).unwrap();
        let q: Arc<dyn Queue> = Arc::new(EmbeddedQueue::open(&lock, "t").await.unwrap());
        let per_queue = 200;
        for name in QueueName::DELIVERY {
            let msgs = (0..per_queue)
                .map(|_| OutMessage {
                    kind: "t",
                    payload: vec![],
                    route: None,
                })
                .collect();
            q.publish_batch(name, msgs).await.unwrap();
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let prefetch = 4;
        let handle = {
            let (order, running, most, shutdown) = (
                order.clone(),
                running.clone(),
                most.clone(),
                shutdown.clone(),
            );
            move |msg: Incoming| {
                let (order, running, most, shutdown) = (
                    order.clone(),
                    running.clone(),
                    most.clone(),
                    shutdown.clone(),
                );
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let done = {
                        let mut o = order.lock().unwrap();
                        o.push(msg.queue);
                        o.len()
                    };
                    running.fetch_sub(1, Ordering::SeqCst);
                    msg.acker.ack().await.unwrap();
                    if done == 3 * per_queue {
                        shutdown.cancel();
                    }
                }
            }
        };
        let classes = [
            (QueueName::DeliveryInteractive, 6),
            (QueueName::Delivery, 3),
            (QueueName::DeliveryBulk, 1),
        ];
        tokio::time::timeout(
            Duration::from_secs(60),
            weighted_loop(q.clone(), &classes, prefetch, shutdown, handle),
        )
        .await
        .unwrap()
        .unwrap();
        // One more for an interactive message held 50 ms by a full budget
        // (a hiccup of a loaded machine).
        assert!(most.load(Ordering::SeqCst) <= usize::from(prefetch) + 1);
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 3 * per_queue, "every message handled");
        // While all three had a backlog (the first 200 starts: interactive
        // runs out after about 333), about 6:3:1.
        let first: Vec<usize> = QueueName::DELIVERY
            .iter()
            .map(|n| order[..200].iter().filter(|q| *q == n).count())
            .collect();
        for (got, want) in first.iter().zip([120, 60, 20]) {
            assert!(got.abs_diff(want) <= 12, "{first:?}");
        }
        drop((q, lock));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_class_starves_whatever_the_weights() {
        let mut p = WeightedPicker::new(&[1000, 1000, 1]);
        let c = starts(&mut p, 2001, |_| true);
        assert_eq!(c[2], 1, "{c:?}");
    }
}
