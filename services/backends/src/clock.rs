//! The wall clock as the backends and services record it: unix
//! milliseconds (message ready times, delivery records, host health).
use std::time::{SystemTime, UNIX_EPOCH};

/// Now, unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Now, unix seconds (0 if the clock is before 1970).
pub fn now_secs() -> i64 {
    now_ms() / 1000
}
