//! The `Cache` contract, run on Redis and on the in-memory cache.
use std::sync::Arc;
use std::time::{Duration, Instant};

use stampede_backends::cache::{Cache, LeaseTake};

/// Instantiates every test of the suite for one implementation:
/// `cache_test_suite!(module, factory)`, with `factory` an
/// `async fn() -> Fixture<Arc<dyn Cache>>`.
macro_rules! cache_test_suite {
    ($module:ident, $factory:path) => {
        mod $module {
            cache_test_suite!(@tests $factory;
                set_get_and_expiry,
                get_many_answers_in_order,
                set_nx_sets_only_an_absent_key,
                incr_counts_in_a_fixed_window,
                hash_incr_extends_the_expiry_and_never_shortens_it,
                hash_get_all_and_hash_del,
                hash_incr_many_adds_to_every_field,
                hash_set_many_replaces_fields_and_keeps_the_rest,
                del_removes_values_counters_and_hashes,
                set_if_sets_only_over_the_expected_value,
                a_semaphore_holds_at_most_its_limit_and_releases,
                a_lease_expires_unless_renewed_and_is_never_revived,
                a_limit_key_lowers_the_limit_in_the_same_call,
                a_reserve_keeps_slots_for_takes_without_one,
            );
        }
    };
    (@tests $factory:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::support::run($factory(), super::$test).await;
            }
        )*
    };
}

cache_test_suite!(redis, crate::support::redis_cache);
cache_test_suite!(memory, crate::support::memory_cache);

const LONG: Duration = Duration::from_secs(60);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sleeps until `at` after `start`. Checks that something is still there
/// count from before the write; checks that it expired, from after it
/// returned: a slow call cannot fail either.
async fn at(start: Instant, at: Duration) {
    tokio::time::sleep_until((start + at).into()).await;
}

async fn sorted(c: &dyn Cache, key: &str) -> Vec<(String, i64)> {
    let mut all = c.hash_get_all(key).await.unwrap();
    all.sort();
    all
}

fn fields(v: &[(&str, i64)]) -> Vec<(String, i64)> {
    v.iter().map(|(f, n)| (f.to_string(), *n)).collect()
}

async fn set_get_and_expiry(c: Arc<dyn Cache>) {
    c.ping().await.unwrap();
    assert_eq!(c.get("k").await.unwrap(), None);
    c.set("k", b"v1", LONG).await.unwrap();
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    // Set again: the new value and its expiry.
    c.set("k", b"v2", ms(600)).await.unwrap();
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    // Values are bytes, zeros included.
    c.set("bin", b"\x00\xff\x00", ms(600)).await.unwrap();
    let written = Instant::now();
    c.set("kept", b"kept", LONG).await.unwrap();
    assert_eq!(
        c.get("bin").await.unwrap().as_deref(),
        Some(&b"\x00\xff\x00"[..])
    );
    at(written, ms(900)).await;
    assert_eq!(c.get("k").await.unwrap(), None, "expired");
    assert_eq!(c.get("bin").await.unwrap(), None, "expired");
    assert_eq!(c.get("kept").await.unwrap().as_deref(), Some(&b"kept"[..]));
    c.ping().await.unwrap();
}

async fn get_many_answers_in_order(c: Arc<dyn Cache>) {
    assert!(c.get_many(&[]).await.unwrap().is_empty());
    c.set("a", b"1", LONG).await.unwrap();
    c.set("c", b"3", LONG).await.unwrap();
    c.set("short", b"s", ms(300)).await.unwrap();
    let written = Instant::now();
    let keys: Vec<String> = ["c", "b", "a", "short", "a"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(
        c.get_many(&keys).await.unwrap(),
        [
            Some(b"3".to_vec()),
            None,
            Some(b"1".to_vec()),
            Some(b"s".to_vec()),
            Some(b"1".to_vec()),
        ]
    );
    at(written, ms(500)).await;
    assert_eq!(
        c.get_many(&keys[2..4]).await.unwrap(),
        [Some(b"1".to_vec()), None],
        "expired"
    );
}

async fn set_nx_sets_only_an_absent_key(c: Arc<dyn Cache>) {
    assert!(c.set_nx("k", b"first", ms(500)).await.unwrap());
    let written = Instant::now();
    assert!(!c.set_nx("k", b"second", LONG).await.unwrap());
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"first"[..]));
    c.set("other", b"set", LONG).await.unwrap();
    assert!(!c.set_nx("other", b"nx", LONG).await.unwrap());
    assert_eq!(c.get("other").await.unwrap().as_deref(), Some(&b"set"[..]));

    // Expired is absent; the refused write did not extend it.
    at(written, ms(800)).await;
    assert_eq!(c.get("k").await.unwrap(), None);
    assert!(c.set_nx("k", b"third", LONG).await.unwrap());
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"third"[..]));
}

async fn incr_counts_in_a_fixed_window(c: Arc<dyn Cache>) {
    let start = Instant::now();
    let window = ms(800);
    assert_eq!(c.incr("n", window).await.unwrap(), 1);
    let created = Instant::now();
    for want in 2..=3 {
        assert_eq!(c.incr("n", window).await.unwrap(), want);
    }
    assert_eq!(c.incr("m", window).await.unwrap(), 1, "another counter");
    // Later increments do not move the window's end...
    at(start, ms(400)).await;
    assert_eq!(c.incr("n", window).await.unwrap(), 4);
    // ...which comes `window` after the counter was created.
    at(created, ms(1100)).await;
    assert_eq!(c.incr("n", window).await.unwrap(), 1, "a new window");
    assert_eq!(c.incr("n", window).await.unwrap(), 2);
}

async fn hash_incr_extends_the_expiry_and_never_shortens_it(c: Arc<dyn Cache>) {
    let start = Instant::now();
    assert_eq!(c.hash_incr("h", "a", 1, ms(1500)).await.unwrap(), 1);
    // Shorter expiries later do not cut it short.
    assert_eq!(c.hash_incr("h", "a", 2, ms(200)).await.unwrap(), 3);
    assert_eq!(c.hash_incr("h", "b", -1, ms(200)).await.unwrap(), -1);
    at(start, ms(500)).await;
    assert_eq!(sorted(&*c, "h").await, fields(&[("a", 3), ("b", -1)]));
    // A longer one extends it: from about 1.5 s to about 2 s.
    assert_eq!(c.hash_incr("h", "a", 1, ms(1500)).await.unwrap(), 4);
    let extended = Instant::now();
    at(start, ms(1750)).await;
    assert_eq!(sorted(&*c, "h").await, fields(&[("a", 4), ("b", -1)]));
    at(extended, ms(1800)).await;
    assert!(c.hash_get_all("h").await.unwrap().is_empty(), "expired");
    // Gone means counting starts again.
    assert_eq!(c.hash_incr("h", "a", 5, LONG).await.unwrap(), 5);
}

async fn hash_get_all_and_hash_del(c: Arc<dyn Cache>) {
    assert!(c.hash_get_all("h").await.unwrap().is_empty());
    for (f, by) in [("a", 1), ("b", 2), ("c", 3), ("c", 4)] {
        c.hash_incr("h", f, by, LONG).await.unwrap();
    }
    c.hash_incr("other", "a", 9, LONG).await.unwrap();
    assert_eq!(
        sorted(&*c, "h").await,
        fields(&[("a", 1), ("b", 2), ("c", 7)])
    );

    c.hash_del("h", &["a".into(), "missing".into()])
        .await
        .unwrap();
    assert_eq!(sorted(&*c, "h").await, fields(&[("b", 2), ("c", 7)]));
    c.hash_del("h", &[]).await.unwrap();
    c.hash_del("absent", &["a".into()]).await.unwrap();
    assert_eq!(sorted(&*c, "h").await, fields(&[("b", 2), ("c", 7)]));
    c.hash_del("h", &["b".into(), "c".into()]).await.unwrap();
    assert!(c.hash_get_all("h").await.unwrap().is_empty());
    assert_eq!(c.hash_incr("h", "c", 1, LONG).await.unwrap(), 1);
    assert_eq!(sorted(&*c, "other").await, fields(&[("a", 9)]));
}

async fn del_removes_values_counters_and_hashes(c: Arc<dyn Cache>) {
    c.set("k", b"v", LONG).await.unwrap();
    c.set("kept", b"v", LONG).await.unwrap();
    c.del("k").await.unwrap();
    c.del("absent").await.unwrap();
    assert_eq!(c.get("k").await.unwrap(), None);
    assert!(c.set_nx("k", b"again", LONG).await.unwrap());
    assert_eq!(c.get("kept").await.unwrap().as_deref(), Some(&b"v"[..]));

    assert_eq!(c.incr("n", LONG).await.unwrap(), 1);
    assert_eq!(c.incr("n", LONG).await.unwrap(), 2);
    c.del("n").await.unwrap();
    assert_eq!(c.incr("n", LONG).await.unwrap(), 1);

    c.hash_incr("h", "a", 3, LONG).await.unwrap();
    c.del("h").await.unwrap();
    assert!(c.hash_get_all("h").await.unwrap().is_empty());
    assert_eq!(c.hash_incr("h", "a", 1, LONG).await.unwrap(), 1);
}

async fn set_if_sets_only_over_the_expected_value(c: Arc<dyn Cache>) {
    assert!(c.set_if("k", None, b"1", LONG).await.unwrap(), "absent");
    assert!(!c.set_if("k", None, b"2", LONG).await.unwrap(), "present");
    assert!(!c.set_if("k", Some(b"0"), b"2", LONG).await.unwrap());
    assert!(c.set_if("k", Some(b"1"), b"2", ms(300)).await.unwrap());
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"2"[..]));
    let written = Instant::now();
    at(written, ms(500)).await;
    assert!(
        !c.set_if("k", Some(b"2"), b"3", LONG).await.unwrap(),
        "expired is absent"
    );
    assert!(c.set_if("k", None, b"3", LONG).await.unwrap());
}

fn take<'a>(key: &'a str, holder: &'a str, limit: u32, ttl: Duration) -> Option<LeaseTake<'a>> {
    Some(LeaseTake {
        key,
        holder,
        limit,
        limit_key: None,
        reserve: 0,
        ttl,
    })
}

fn pair(sem: &str, holder: &str) -> (String, String) {
    (sem.to_string(), holder.to_string())
}

async fn a_semaphore_holds_at_most_its_limit_and_releases(c: Arc<dyn Cache>) {
    c.set("state", b"s", LONG).await.unwrap();
    let read = ["state".to_string(), "absent".to_string()];
    let a = c
        .lease(&[], &read, take("sem", "a", 2, LONG))
        .await
        .unwrap();
    assert!(a.taken && a.held == 1 && a.limit == 2, "{a:?}");
    assert_eq!(
        a.values,
        [Some(b"s".to_vec()), None],
        "read in the same call"
    );
    assert!(
        c.lease(&[], &[], take("sem", "b", 2, LONG))
            .await
            .unwrap()
            .taken
    );
    let full = c.lease(&[], &[], take("sem", "c", 2, LONG)).await.unwrap();
    assert!(
        !full.taken && !full.already_held && full.held == 2,
        "{full:?}"
    );
    // A holder that holds one takes no second, and is told so (a job in
    // flight elsewhere), even where there is room.
    let again = c
        .lease(&[], &[], take("other2", "j", 3, LONG))
        .await
        .unwrap();
    assert!(again.taken && !again.already_held, "{again:?}");
    let twice = c
        .lease(&[], &[], take("other2", "j", 3, LONG))
        .await
        .unwrap();
    assert!(
        !twice.taken && twice.already_held && twice.held == 1,
        "{twice:?}"
    );
    c.lease(&[pair("other2", "j")], &[], None).await.unwrap();
    // Another semaphore is not affected.
    assert!(
        c.lease(&[], &[], take("other", "c", 1, LONG))
            .await
            .unwrap()
            .taken
    );
    assert_eq!(
        c.lease_counts(&["sem".into(), "other".into(), "none".into()])
            .await
            .unwrap(),
        [2, 1, 0]
    );
    // A release in the same call frees the slot taken.
    let c2 = c
        .lease(&[pair("sem", "a")], &[], take("sem", "c", 2, LONG))
        .await
        .unwrap();
    assert!(c2.taken && c2.held == 2, "{c2:?}");
    // Releasing twice, or what was never held, is harmless.
    c.lease(&[pair("sem", "a"), pair("nothing", "x")], &[], None)
        .await
        .unwrap();
    c.lease(&[pair("sem", "b"), pair("sem", "c")], &[], None)
        .await
        .unwrap();
    assert_eq!(c.lease_counts(&["sem".into()]).await.unwrap(), [0]);
    // Read only.
    let r = c.lease(&[], &read, None).await.unwrap();
    assert!(!r.taken && r.values[0].is_some(), "{r:?}");
    c.del("other").await.unwrap();
    assert_eq!(c.lease_counts(&["other".into()]).await.unwrap(), [0]);
}

async fn a_lease_expires_unless_renewed_and_is_never_revived(c: Arc<dyn Cache>) {
    let start = Instant::now();
    assert!(
        c.lease(&[], &[], take("sem", "a", 2, ms(400)))
            .await
            .unwrap()
            .taken
    );
    assert!(
        c.lease(&[], &[], take("sem", "b", 2, ms(400)))
            .await
            .unwrap()
            .taken
    );
    at(start, ms(200)).await;
    assert_eq!(
        c.lease_renew(&[pair("sem", "a"), pair("sem", "x")], ms(800))
            .await
            .unwrap(),
        1
    );
    // b expired (a killed worker's slot came back); a was renewed.
    at(start, ms(600)).await;
    assert_eq!(c.lease_counts(&["sem".into()]).await.unwrap(), [1]);
    let t = c.lease(&[], &[], take("sem", "c", 2, LONG)).await.unwrap();
    assert!(t.taken && t.held == 2, "{t:?}");
    // An expired lease is not revived by a renewal.
    assert_eq!(c.lease_renew(&[pair("sem", "b")], LONG).await.unwrap(), 0);
    assert!(
        !c.lease(&[], &[], take("sem", "d", 2, LONG))
            .await
            .unwrap()
            .taken
    );
}

async fn a_limit_key_lowers_the_limit_in_the_same_call(c: Arc<dyn Cache>) {
    let with_key = |holder: &'static str| {
        Some(LeaseTake {
            key: "sem",
            holder,
            limit: 8,
            limit_key: Some("limit"),
            reserve: 0,
            ttl: LONG,
        })
    };
    // Absent: the given limit.
    let a = c.lease(&[], &[], with_key("a")).await.unwrap();
    assert_eq!((a.taken, a.limit), (true, 8));
    // Thousandths, with what follows the number ignored: 2.5 -> 2.
    c.set("limit", b"2500:4:123", LONG).await.unwrap();
    let b = c.lease(&[], &[], with_key("b")).await.unwrap();
    assert_eq!((b.taken, b.held, b.limit), (true, 2, 2));
    assert!(!c.lease(&[], &[], with_key("c")).await.unwrap().taken);
    // Never below one; never above the given limit.
    c.set("limit", b"10", LONG).await.unwrap();
    assert_eq!(c.lease(&[], &[], with_key("c")).await.unwrap().limit, 1);
    c.set("limit", b"99000", LONG).await.unwrap();
    assert_eq!(c.lease(&[], &[], with_key("c")).await.unwrap().limit, 8);
}

async fn hash_incr_many_adds_to_every_field(c: Arc<dyn Cache>) {
    c.hash_incr_many("h", &[], LONG).await.unwrap();
    assert!(c.hash_get_all("h").await.unwrap().is_empty());
    c.hash_incr("h", "a", 1, LONG).await.unwrap();
    let by = [("a".to_string(), 2), ("b".to_string(), 5)];
    c.hash_incr_many("h", &by, ms(100)).await.unwrap();
    assert_eq!(sorted(&*c, "h").await, fields(&[("a", 3), ("b", 5)]));
    let written = Instant::now();
    // The shorter expiry did not cut the hash short.
    at(written, ms(300)).await;
    assert_eq!(sorted(&*c, "h").await.len(), 2);
    c.hash_incr_many("short", &by, ms(200)).await.unwrap();
    let written = Instant::now();
    at(written, ms(400)).await;
    assert!(c.hash_get_all("short").await.unwrap().is_empty(), "expired");
}

async fn hash_set_many_replaces_fields_and_keeps_the_rest(c: Arc<dyn Cache>) {
    c.hash_set_many("s", &[], LONG).await.unwrap();
    assert!(c.hash_get_all("s").await.unwrap().is_empty());
    c.hash_incr("s", "a", 7, LONG).await.unwrap();
    c.hash_incr("s", "keep", 1, LONG).await.unwrap();
    let values = [("a".to_string(), -2), ("b".to_string(), 1_796_574_642_278)];
    c.hash_set_many("s", &values, LONG).await.unwrap();
    assert_eq!(
        sorted(&*c, "s").await,
        fields(&[("a", -2), ("b", 1_796_574_642_278), ("keep", 1)])
    );
    c.hash_set_many("short", &values, ms(200)).await.unwrap();
    let written = Instant::now();
    at(written, ms(400)).await;
    assert!(c.hash_get_all("short").await.unwrap().is_empty(), "expired");
}

async fn a_reserve_keeps_slots_for_takes_without_one(c: Arc<dyn Cache>) {
    let take = |holder: &'static str, reserve: u32| {
        Some(LeaseTake {
            key: "sem",
            holder,
            limit: 3,
            limit_key: Some("limit"),
            reserve,
            ttl: LONG,
        })
    };
    assert!(c.lease(&[], &[], take("a", 1)).await.unwrap().taken);
    let b = c.lease(&[], &[], take("b", 1)).await.unwrap();
    assert_eq!((b.taken, b.limit), (true, 2));
    assert!(
        !c.lease(&[], &[], take("c", 1)).await.unwrap().taken,
        "reserved"
    );
    assert!(
        c.lease(&[], &[], take("c", 0)).await.unwrap().taken,
        "the reserve"
    );
    // A limit of 1 (here lowered by the limit key) keeps nothing back.
    c.lease(
        &[pair("sem", "a"), pair("sem", "b"), pair("sem", "c")],
        &[],
        None,
    )
    .await
    .unwrap();
    c.set("limit", b"1000", LONG).await.unwrap();
    let one = c.lease(&[], &[], take("d", 1)).await.unwrap();
    assert_eq!((one.taken, one.limit), (true, 1));
}
