//! Prometheus metrics (text exposition on `STAMPEDE_METRICS_ADDR`) and the
//! `/healthz` (alive) and `/readyz` (backends answer) endpoints. Labels hold
//! only bounded values: outcomes, queues, results; never hosts or ids.
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Backends;

/// One label pair with a bounded value.
pub type Label = [(&'static str, &'static str); 1];

/// What became of one delivery job when a worker handled it: the label
/// `outcome` of `stampede_deliveries_total`. The metric's help text and the
/// README's list derive from [`DeliveryOutcome::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    /// The remote answered 2xx.
    Delivered,
    /// 408, 429, 5xx, a timeout or a connection error: queued for a retry.
    Retry,
    /// Another 4xx, or retries exhausted: dead-lettered.
    Failed,
    /// 410 Gone: dead-lettered, the follows delivered to that inbox removed.
    Gone,
    /// The SSRF guard refused the target: dead-lettered.
    Refused,
    /// Already delivered, or the target is this server: dropped.
    Skipped,
    /// The target's domain is suspended (or not allowed): dropped at send
    /// time, not a dead letter.
    Suspended,
    /// A `Create`/`Update` whose object its author has since deleted: not sent.
    Superseded,
    /// The host has failed for `STAMPEDE_HOST_UNAVAILABLE_SECS`: dead-lettered.
    Unavailable,
    /// The host is paused by an operator: parked.
    Parked,
    /// The host's circuit is open: parked until it closes.
    CircuitOpen,
    /// The host's lane is full: parked.
    Deferred,
    /// This worker ran out of descriptors, ports or memory: parked, not an
    /// attempt, no host failure.
    LocalExhausted,
    /// A half-open probe found the host back.
    ProbeOk,
    /// A half-open probe failed: the circuit opens again, for longer.
    ProbeFailed,
}

impl DeliveryOutcome {
    /// Every outcome.
    pub const ALL: [DeliveryOutcome; 15] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Suspended,
        DeliveryOutcome::Retry,
        DeliveryOutcome::Failed,
        DeliveryOutcome::Gone,
        DeliveryOutcome::Refused,
        DeliveryOutcome::Skipped,
        DeliveryOutcome::Superseded,
        DeliveryOutcome::Unavailable,
        DeliveryOutcome::Parked,
        DeliveryOutcome::CircuitOpen,
        DeliveryOutcome::Deferred,
        DeliveryOutcome::LocalExhausted,
        DeliveryOutcome::ProbeOk,
        DeliveryOutcome::ProbeFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retry => "retry",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::Gone => "gone",
            DeliveryOutcome::Refused => "refused",
            DeliveryOutcome::Skipped => "skipped",
            DeliveryOutcome::Suspended => "suspended",
            DeliveryOutcome::Superseded => "superseded",
            DeliveryOutcome::Unavailable => "unavailable",
            DeliveryOutcome::Parked => "parked",
            DeliveryOutcome::CircuitOpen => "circuit_open",
            DeliveryOutcome::Deferred => "deferred",
            DeliveryOutcome::LocalExhausted => "local_exhausted",
            DeliveryOutcome::ProbeOk => "probe_ok",
            DeliveryOutcome::ProbeFailed => "probe_failed",
        }
    }

    /// Whether the delivery ends here with a dead letter.
    pub fn is_dead_letter(self) -> bool {
        matches!(
            self,
            DeliveryOutcome::Failed
                | DeliveryOutcome::Gone
                | DeliveryOutcome::Refused
                | DeliveryOutcome::Unavailable
        )
    }

    /// The metric's help text: every label value (and the README lists
    /// them all: a test checks).
    fn help() -> &'static str {
        static HELP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        HELP.get_or_init(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|o| o.as_str()).collect();
            format!("Delivery jobs handled, by outcome ({})", names.join(", "))
        })
    }
}

/// Every metric stampede exports.
pub struct Metrics {
    registry: Registry,
    /// Activities accepted by `Publish`.
    pub published: Counter,
    /// Delivery jobs queued per activity.
    pub fanout_targets: Histogram,
    /// Delivery jobs handled, by [`DeliveryOutcome`].
    pub deliveries: Family<Label, Counter>,
    /// Time of one delivery attempt (sign + POST), seconds.
    pub delivery_seconds: Histogram,
    /// Queue messages that could not be processed, by queue.
    pub poisoned: Family<Label, Counter>,
    /// Remote actor lookups by result (`cache`, `store`, `fetched`, `failed`).
    pub remote_actor_lookups: Family<Label, Counter>,
    /// Key cache lookups (`hit`, `miss`): the hit ratio.
    pub key_cache: Family<Label, Counter>,
    /// Local actor lookups at the inbox edge by where the answer came from
    /// (`memory`, `store`).
    pub local_actor_lookups: Family<Label, Counter>,
    /// Key fetches by result (`fetched`, `gone`, `failed`, `invalid`, `refused`).
    pub key_fetches: Family<Label, Counter>,
    /// Inbound activities by result (`accepted`, `bad_signature`, `stale_date`,
    /// `digest_mismatch`, `duplicate`, `blocked`, `rate_limited`,
    /// `key_unavailable`, `malformed`, `too_large`, `dropped_delete`).
    pub inbound: Family<[(&'static str, &'static str); 2], Counter>,
    /// Time to verify one inbound activity, seconds.
    pub verify_seconds: Histogram,
    /// Ready messages per queue (sampled).
    pub queue_messages: Family<Label, Gauge>,
    /// Per queue consumed by this process: how long its head has waited.
    /// Set to the wait of each message taken from it, and between takes
    /// (sampled) grown by the time since while the queue has ready
    /// messages: a worker whose every slot is held shows its queue ageing
    /// though it takes nothing. 0 once the queue has none ready.
    pub queue_oldest_age: Family<Label, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Per queue: when the message last taken from it became ready (unix
    /// ms), for the head age between takes.
    queue_last_ready: std::sync::Mutex<std::collections::HashMap<&'static str, i64>>,
    /// Messages taken from each queue and started, by queue (each delivery
    /// class is a queue: the share each class gets).
    pub queue_consumed: Family<Label, Counter>,
    /// Activities fanned out, by delivery class (`interactive`, `normal`,
    /// `bulk`).
    pub fanout_classes: Family<Label, Counter>,
    /// Bulk fanouts put back because the bulk queue was over
    /// `STAMPEDE_BULK_QUEUE_BOUND`.
    pub fanout_paused: Counter,
    /// Deliveries in flight by host class (`normal`, `ramping`, `probe`).
    pub delivery_in_flight: Family<Label, Gauge>,
    /// Changes of hosts' adaptive limits by this worker: `cut` (429, 5xx,
    /// timeout) and `grown` (a round of fast successes).
    pub host_limit_changes: Family<Label, Counter>,
    /// Tries of recording an answered delivery's outcome that failed (a
    /// store or broker away) and were made again, the message held.
    pub settle_retries: Counter,
    /// Jobs that waited in the worker for a host's slot, and how long
    /// (seconds): the waits that used to be 5 s parks.
    pub slot_wait_seconds: Histogram,
    /// Remote hosts whose deliveries are failing (sampled from the store).
    pub hosts_failing: Gauge,
    /// Domain policy rules this process holds (reloaded within 5 s of a
    /// change).
    pub domain_policies: Gauge,
    /// Follower inboxes fanout did not queue, by reason (`blocked`: a
    /// blocked domain; `own_host`: this server, a loop; `unavailable`: a
    /// host failing for STAMPEDE_HOST_UNAVAILABLE_SECS).
    pub fanout_skipped: Family<Label, Counter>,
    /// Deliveries parked in the delay queues by reason (`paused`,
    /// `circuit_open`, `saturated`, `local_exhausted`, `retry`), sampled
    /// from the shared cache by the delivery service
    /// (`stampede_federation::parked::sample`).
    pub delivery_parked: Family<Label, Gauge>,
    /// Rows deleted by the retention pruner, by table (`deliveries`: success
    /// records; `dead_letters`).
    pub retention_pruned: Family<Label, Counter>,
}

impl Metrics {
    /// Registers every metric under the `stampede_` prefix.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("stampede");
        let published = Counter::default();
        registry.register(
            "published_activities",
            "Activities accepted by Publish",
            published.clone(),
        );
        let fanout_targets = Histogram::new(exponential_buckets(1.0, 4.0, 10));
        registry.register(
            "fanout_targets",
            "Delivery jobs queued per activity",
            fanout_targets.clone(),
        );
        let deliveries = Family::<Label, Counter>::default();
        registry.register("deliveries", DeliveryOutcome::help(), deliveries.clone());
        for o in DeliveryOutcome::ALL {
            // Every outcome shows from the start, at 0.
            let _ = deliveries.get_or_create(&[("outcome", o.as_str())]);
        }
        let delivery_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "delivery_duration_seconds",
            "Time of one delivery attempt, signing and POST",
            delivery_seconds.clone(),
        );
        let poisoned = Family::<Label, Counter>::default();
        registry.register(
            "queue_poisoned_messages",
            "Queue messages moved to the dead-letter queue because they could not be processed",
            poisoned.clone(),
        );
        let remote_actor_lookups = Family::<Label, Counter>::default();
        registry.register(
            "remote_actor_lookups",
            "Remote actor lookups by where the answer came from",
            remote_actor_lookups.clone(),
        );
        let key_cache = Family::<Label, Counter>::default();
        registry.register(
            "key_cache_lookups",
            "Remote key lookups by cache result",
            key_cache.clone(),
        );
        let local_actor_lookups = Family::<Label, Counter>::default();
        registry.register(
            "local_actor_lookups",
            "Local actor lookups at the inbox edge by where the answer came from (memory, store)",
            local_actor_lookups.clone(),
        );
        for source in ["memory", "store"] {
            drop(local_actor_lookups.get_or_create(&[("source", source)]));
        }
        let key_fetches = Family::<Label, Counter>::default();
        registry.register(
            "key_fetches",
            "Remote key fetches by result",
            key_fetches.clone(),
        );
        let inbound = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "inbound_activities",
            "Inbound activities by stage (edge, verify) and result",
            inbound.clone(),
        );
        let verify_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "inbound_verify_duration_seconds",
            "Time to verify one inbound activity",
            verify_seconds.clone(),
        );
        let queue_messages = Family::<Label, Gauge>::default();
        registry.register(
            "queue_messages",
            "Ready messages per queue",
            queue_messages.clone(),
        );
        let queue_oldest_age = Family::<Label, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "queue_oldest_message_age_seconds",
            "How long the head of the queue has waited: the wait of the message last taken from it, grown since while messages are ready",
            queue_oldest_age.clone(),
        );
        let queue_consumed = Family::<Label, Counter>::default();
        registry.register(
            "queue_consumed_messages",
            "Messages taken from each queue and started",
            queue_consumed.clone(),
        );
        let fanout_classes = Family::<Label, Counter>::default();
        registry.register(
            "fanout_activities",
            "Activities fanned out, by delivery class (interactive, normal, bulk)",
            fanout_classes.clone(),
        );
        let fanout_paused = Counter::default();
        registry.register(
            "fanout_paused",
            "Bulk fanouts put back because the bulk delivery queue was over its bound",
            fanout_paused.clone(),
        );
        let delivery_in_flight = Family::<Label, Gauge>::default();
        registry.register(
            "delivery_in_flight",
            "Deliveries in flight by host class (normal, ramping, probe)",
            delivery_in_flight.clone(),
        );
        let host_limit_changes = Family::<Label, Counter>::default();
        registry.register(
            "host_limit_changes",
            "Changes of hosts' adaptive concurrency limits (cut, grown)",
            host_limit_changes.clone(),
        );
        let settle_retries = Counter::default();
        registry.register(
            "delivery_settle_retries",
            "Failed tries of recording an answered delivery's outcome, made again with the message held",
            settle_retries.clone(),
        );
        let slot_wait_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "delivery_slot_wait_seconds",
            "Time a delivery waited in the worker for a slot of its host",
            slot_wait_seconds.clone(),
        );
        let hosts_failing = Gauge::default();
        registry.register(
            "hosts_failing",
            "Remote hosts whose deliveries are failing",
            hosts_failing.clone(),
        );
        let domain_policies = Gauge::default();
        registry.register(
            "domain_policies",
            "Domain policy rules this process holds",
            domain_policies.clone(),
        );
        let fanout_skipped = Family::<Label, Counter>::default();
        registry.register(
            "fanout_skipped_targets",
            "Target inboxes fanout did not queue, by reason (blocked, own_host, unavailable)",
            fanout_skipped.clone(),
        );
        let delivery_parked = Family::<Label, Gauge>::default();
        registry.register(
            "delivery_parked",
            "Deliveries parked in the delay queues (waiting, not tried) by reason",
            delivery_parked.clone(),
        );
        let retention_pruned = Family::<Label, Counter>::default();
        registry.register(
            "retention_pruned",
            "Rows deleted by the retention pruner, by table (deliveries, dead_letters)",
            retention_pruned.clone(),
        );
        for table in ["deliveries", "dead_letters"] {
            drop(retention_pruned.get_or_create(&[("table", table)]));
        }
        Arc::new(Self {
            retention_pruned,
            fanout_skipped,
            delivery_parked,
            queue_messages,
            queue_oldest_age,
            queue_last_ready: Default::default(),
            queue_consumed,
            fanout_classes,
            fanout_paused,
            delivery_in_flight,
            host_limit_changes,
            settle_retries,
            slot_wait_seconds,
            hosts_failing,
            domain_policies,
            registry,
            key_cache,
            local_actor_lookups,
            key_fetches,
            inbound,
            verify_seconds,
            published,
            fanout_targets,
            deliveries,
            delivery_seconds,
            poisoned,
            remote_actor_lookups,
        })
    }

    /// Counts one delivery outcome.
    pub fn delivery(&self, outcome: DeliveryOutcome) {
        self.deliveries
            .get_or_create(&[("outcome", outcome.as_str())])
            .inc();
    }

    /// Deliveries counted so far with this outcome.
    pub fn delivery_count(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries
            .get_or_create(&[("outcome", outcome.as_str())])
            .get()
    }

    /// Inbound activities counted so far at `stage` with `result`.
    pub fn inbound_count(&self, stage: &'static str, result: &'static str) -> u64 {
        self.inbound
            .get_or_create(&[("stage", stage), ("result", result)])
            .get()
    }

    /// Counts one inbound result at the edge (ingest's cheap checks).
    pub fn inbound_edge(&self, result: &'static str) {
        self.inbound
            .get_or_create(&[("stage", "edge"), ("result", result)])
            .inc();
    }

    /// Counts one inbound result of verification (the inbox service).
    pub fn inbound_verify(&self, result: &'static str) {
        self.inbound
            .get_or_create(&[("stage", "verify"), ("result", result)])
            .inc();
    }

    /// Records the wait of a message just taken from `queue`.
    pub fn queue_age(&self, queue: &'static str, ready_unix_ms: Option<i64>) {
        self.queue_consumed.get_or_create(&[("queue", queue)]).inc();
        if let Some(ready) = ready_unix_ms {
            let age = (stampede_backends::clock::now_ms() - ready).max(0) as f64 / 1000.0;
            self.queue_oldest_age
                .get_or_create(&[("queue", queue)])
                .set(age);
            self.last_ready_map().insert(queue, ready);
        }
    }

    /// When the message last taken from `queue` by this process became
    /// ready (unix ms); `None` when it has taken none.
    pub fn last_ready(&self, queue: &str) -> Option<i64> {
        self.last_ready_map().get(queue).copied()
    }

    fn last_ready_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<&'static str, i64>> {
        self.queue_last_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The head age of a queue this process consumes, given its ready
    /// messages now: the wait of the message last taken from it grown by
    /// the time since, while it has any. Updates the gauge.
    fn age_head(&self, queue: &'static str, ready_messages: u64) {
        let Some(ready) = self.last_ready(queue) else {
            return;
        };
        let age = if ready_messages == 0 {
            0.0
        } else {
            (stampede_backends::clock::now_ms() - ready).max(0) as f64 / 1000.0
        };
        self.queue_oldest_age
            .get_or_create(&[("queue", queue)])
            .set(age);
    }

    /// Samples queue depths and failing hosts every
    /// `every` until `shutdown`.
    pub async fn sample(
        self: Arc<Self>,
        backends: Backends,
        every: std::time::Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Ok(depths) = backends.queue.depths().await {
                for d in depths {
                    self.queue_messages
                        .get_or_create(&[("queue", d.name.suffix())])
                        .set(d.messages as i64);
                    self.age_head(d.name.suffix(), d.messages);
                }
            }
            if let Ok(h) = backends.store.failing_hosts(10_000).await {
                self.hosts_failing.set(h.len() as i64);
            }
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    backends: Backends,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    backends: Backends,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState { metrics, backends });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    match s.backends.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ages_while_messages_wait_and_nothing_is_taken() {
        let m = Metrics::new();
        let now = stampede_backends::clock::now_ms();
        m.queue_age("delivery.interactive", Some(now - 1500));
        let age = |m: &Metrics| {
            m.queue_oldest_age
                .get_or_create(&[("queue", "delivery.interactive")])
                .get()
        };
        assert!((1.4..2.0).contains(&age(&m)), "{}", age(&m));
        assert_eq!(m.last_ready("delivery.interactive"), Some(now - 1500));
        assert_eq!(m.last_ready("delivery.bulk"), None);
        // Messages wait and nothing is taken for a while: the head ages.
        m.queue_last_ready
            .lock()
            .unwrap()
            .insert("delivery.interactive", now - 9000);
        m.age_head("delivery.interactive", 3);
        assert!(age(&m) >= 9.0, "{}", age(&m));
        // Nothing ready: no head, no age.
        m.age_head("delivery.interactive", 0);
        assert_eq!(age(&m), 0.0);
        // A queue this process never took from is left alone.
        m.age_head("delivery.bulk", 5);
        assert!(!m.render().contains("queue=\"delivery.bulk\""));
        assert!(m
            .render()
            .contains("stampede_queue_consumed_messages_total{queue=\"delivery.interactive\"} 1"));
    }

    #[test]
    fn every_delivery_outcome_is_exposed_and_documented() {
        let m = Metrics::new();
        m.delivery(DeliveryOutcome::Delivered);
        let text = m.render();
        let readme = include_str!("../../../README.md");
        let documented = readme
            .split("`stampede_deliveries_total{outcome}`:")
            .nth(1)
            .and_then(|s| s.split("\n\n").next())
            .unwrap_or_default();
        for o in DeliveryOutcome::ALL {
            let label = format!("stampede_deliveries_total{{outcome=\"{}\"}}", o.as_str());
            assert!(text.contains(&label), "{label} missing from /metrics");
            assert!(
                documented.contains(&format!("`{}`", o.as_str())),
                "README does not list the outcome {}",
                o.as_str()
            );
        }
        assert!(text.contains("stampede_deliveries_total{outcome=\"delivered\"} 1"));
        assert_eq!(m.delivery_count(DeliveryOutcome::Delivered), 1);
    }
}
