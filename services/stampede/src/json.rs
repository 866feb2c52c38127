//! `--json` output of `status`, `actor get` and `dlq list`: one JSON
//! document each, field names as in the gRPC messages (`api.proto`), for
//! scripts. Times are unix milliseconds; an absent status is `null`.
use serde_json::{json, Value};
use stampede_proto::api::{Actor, DeadLetter, StatusResponse};

/// `stampede status --json`.
pub fn status(s: &StatusResponse) -> Value {
    json!({
        "queues": s.queues.iter().map(|q| json!({
            "queue": q.queue,
            "messages": q.messages,
            "consumers": q.consumers,
            "class": (!q.class.is_empty()).then_some(&q.class),
            "head_age_ms": q.head_age_ms,
        })).collect::<Vec<_>>(),
        "activities": s.activities,
        "delivered": s.delivered,
        "failed": s.failed,
        "dead_letters": s.dead_letters,
        "paused_hosts": s.paused_hosts,
        "failing_hosts": s.failing_hosts.iter().map(|h| json!({
            "host": h.host,
            "failures": h.failures,
            "failing_since_unix_ms": h.failing_since_unix_ms,
            "circuit_open_until_unix_ms": (h.circuit_open_until_unix_ms > 0)
                .then_some(h.circuit_open_until_unix_ms),
            "unavailable": h.unavailable,
        })).collect::<Vec<_>>(),
        "parked": s.parked.iter().map(|p| json!({
            "reason": p.reason,
            "deliveries": p.deliveries,
            "next_due_unix_ms": p.next_due_unix_ms,
        })).collect::<Vec<_>>(),
        "busy_hosts": s.busy_hosts.iter().map(|h| json!({
            "host": h.host,
            "deliveries": h.deliveries,
            "latency_ms": h.latency_ms,
            "in_flight": h.in_flight,
            "limit": h.limit,
        })).collect::<Vec<_>>(),
    })
}

/// `stampede actor get NAME --json`.
pub fn actor(a: &Actor) -> Value {
    json!({
        "name": a.name,
        "id": a.id,
        "inbox": a.inbox,
        "shared_inbox": a.shared_inbox,
        "followers": a.followers,
        "key_id": a.key_id,
        "public_key_pem": a.public_key_pem,
        "manually_approves_followers": a.manually_approves_followers,
        "followers_count": a.followers_count,
    })
}

/// `stampede dlq list --json`.
pub fn dead_letters(rows: &[DeadLetter]) -> Value {
    Value::Array(
        rows.iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "activity_id": d.activity_id,
                    "inbox": d.inbox,
                    "host": d.host,
                    "reason": d.reason,
                    "last_status": (d.last_status != 0).then_some(d.last_status),
                    "attempts": d.attempts,
                    "first_attempt_unix_ms": d.first_attempt_unix_ms,
                    "last_attempt_unix_ms": d.last_attempt_unix_ms,
                })
            })
            .collect(),
    )
}
