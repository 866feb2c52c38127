//! What an inbox's answer means for a delivery, and the retry schedule.
use std::time::Duration;

/// The meaning of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Delivered {
        /// The status.
        status: u16,
    },
    /// 408, 429, 5xx, timeouts, connection errors: try again later.
    Retry {
        /// The status, when a response came.
        status: Option<u16>,
        /// What happened.
        reason: String,
        /// The `Retry-After` header, when given.
        retry_after: Option<String>,
    },
    /// Other 4xx, or a job that can never succeed: stop.
    Permanent {
        /// The status, when a response came.
        status: Option<u16>,
        /// What happened.
        reason: String,
    },
    /// The SSRF guard refused the target.
    Refused {
        /// Why.
        reason: String,
    },
}

/// Classifies a response status, or a transport error when no response came.
pub fn classify(status: Option<u16>, error: Option<String>) -> Outcome {
    match status {
        Some(s @ 200..=299) => Outcome::Delivered { status: s },
        Some(s @ (408 | 429 | 500..=599)) => Outcome::Retry {
            status: Some(s),
            reason: format!("http {s}"),
            retry_after: None,
        },
        Some(s) => Outcome::Permanent {
            status: Some(s),
            reason: format!("http {s}"),
        },
        None => Outcome::Retry {
            status: None,
            reason: error.unwrap_or_else(|| "no response".into()),
            retry_after: None,
        },
    }
}

/// The delay before retry number `attempt + 1` of `schedule` (seconds), with
/// ±20 % jitter so retries to a recovering server spread out; `Retry-After`
/// (seconds or an HTTP date) wins when longer. `None` when the schedule is
/// exhausted.
pub fn retry_delay(schedule: &[u64], attempt: u32, retry_after: Option<&str>) -> Option<Duration> {
    let base = *schedule.get(attempt as usize)?;
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    let mut d = Duration::from_secs_f64(base as f64 * jitter);
    if let Some(ra) = retry_after.and_then(parse_retry_after) {
        d = d.max(ra);
    }
    Some(d)
}

/// When an interactive delivery answered 429 comes back: after the
/// host's `Retry-After`, 5 s without one, within 1 s to 60 s.
pub fn busy_delay(retry_after: Option<&str>) -> Duration {
    retry_after
        .and_then(parse_retry_after)
        .unwrap_or(Duration::from_secs(5))
        .clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// The longest `Retry-After` honoured, in either form: a remote cannot park
/// its deliveries for longer than the retry schedule's scale.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    at.duration_since(std::time::SystemTime::now())
        .ok()
        .map(|d| d.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_interactive_delivery_comes_back_soon() {
        assert_eq!(busy_delay(None), Duration::from_secs(5));
        assert_eq!(busy_delay(Some("1")), Duration::from_secs(1));
        assert_eq!(busy_delay(Some("0")), Duration::from_secs(1));
        assert_eq!(busy_delay(Some("86400")), Duration::from_secs(60));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(
            classify(Some(202), None),
            Outcome::Delivered { status: 202 }
        );
        for s in [408, 429, 500, 502, 503] {
            assert!(
                matches!(classify(Some(s), None), Outcome::Retry { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 410, 422] {
            assert!(
                matches!(classify(Some(s), None), Outcome::Permanent { .. }),
                "{s}"
            );
        }
        assert!(matches!(
            classify(None, Some("timed out".into())),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn schedule_grows_and_ends() {
        use stampede_runtime::config::DEFAULT_RETRY_SCHEDULE_SECS as S;
        let first = retry_delay(S, 0, None).unwrap();
        assert!(first <= Duration::from_secs(36) && first >= Duration::from_secs(24));
        assert!(retry_delay(S, S.len() as u32, None).is_none());
        assert!(retry_delay(S, 0, Some("600")).unwrap() >= Duration::from_secs(600));
        // Both forms of Retry-After are capped at a week.
        assert_eq!(parse_retry_after("99999999999"), Some(MAX_RETRY_AFTER));
        let far = httpdate::fmt_http_date(
            std::time::SystemTime::now() + Duration::from_secs(400 * 24 * 3600),
        );
        assert_eq!(parse_retry_after(&far), Some(MAX_RETRY_AFTER));
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        assert!(parse_retry_after(&soon).unwrap() <= Duration::from_secs(120));
        let total: u64 = S.iter().sum();
        assert!(total > 24 * 3600 && total < 3 * 24 * 3600);
    }
}
