//! The `Store` contract, run on PostgreSQL (statements prepared, and
//! unnamed) and on the embedded store.
//!
//! Long on purpose: one test per method of the trait (about 40), each
//! standing alone, in the trait's order.
use stampede_backends::clock::now_ms;
use stampede_backends::store::{
    ActorRef, DomainPolicy, Follower, HostDelivery, HostHealth, Inserted, LocalActor, NewActivity,
    NewActor, NewDeadLetter, PolicyKind, PrivateKey, RemoteActor, RemoteKey, Skip, Store, Totals,
};
use stampede_backends::Error;

use crate::support::StoreCx;

/// Instantiates every test of the suite for one implementation:
/// `store_test_suite!(module, factory)`, with `factory` an
/// `async fn() -> Fixture<StoreCx>` giving a migrated store.
macro_rules! store_test_suite {
    ($module:ident, $factory:path) => {
        mod $module {
            store_test_suite!(@tests $factory;
                migrate_again_changes_nothing_and_ping_answers,
                create_actor_round_trips_and_refuses_a_taken_name,
                ensure_actor_creates_once_even_when_racing,
                actors_are_found_by_name_and_id_and_counted,
                actor_ref_and_profile_read_the_actor_without_its_keys,
                delete_actor_removes_it_with_what_is_its_own,
                add_follower_adds_refreshes_and_remove_follower_removes,
                add_followers_adds_many_and_keeps_existing_ones,
                follower_targets_are_distinct_shared_inboxes_in_pages,
                follower_ids_are_keyset_pages_filtered_by_prefix,
                follower_digests_are_computed_once_then_kept_by_every_change,
                follower_digests_first_computed_while_follows_race_are_exact,
                remove_follow_by_id_removes_only_that_follow,
                remove_followers_by_inbox_matches_personal_and_shared_inboxes,
                remove_follower_everywhere_removes_every_follow,
                update_follower_inboxes_moves_every_follow,
                follow_requests_are_replaced_and_taken_once,
                remote_actors_are_stored_refreshed_and_forgotten,
                remote_keys_are_stored_replaced_and_forgotten_by_owner,
                insert_activity_is_idempotent_by_idempotency_key,
                activities_read_back_with_their_author_and_count,
                mark_fanned_out_records_the_targets,
                deliveries_are_recorded_once,
                dead_letters_list_newest_first_and_replay_oldest_first,
                hosts_are_paused_and_resumed,
                host_health_is_recorded_and_cleared,
                object_deleted_only_by_a_delete_of_that_actor,
                totals_count_activities_deliveries_and_open_dead_letters,
                domain_policies_are_set_replaced_removed_and_seeded_once,
                a_domains_footprint_is_found_and_forgotten,
                unavailable_hosts_are_listed_and_marked_available,
                an_activitys_delivery_is_counted_from_its_records,
                prune_delivery_records_keeps_records_newer_than_the_cutoff,
                prune_dead_letters_by_replay_or_last_attempt,
                purge_dead_letters_of_a_host_or_all_in_batches,
                migrations_racing_one_another_build_the_retention_indexes,
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

store_test_suite!(postgres, crate::support::pg_store);
store_test_suite!(postgres_unnamed, crate::support::pg_store_unnamed);
store_test_suite!(embedded, crate::support::embedded_store);

fn new_actor(name: &str) -> NewActor {
    NewActor {
        name: name.to_string(),
        display_name: format!("{name} (display)"),
        summary: format!("<p>about {name} ü</p>"),
        manually_approves_followers: false,
        // Any bytes, zeros included.
        private_key: PrivateKey(vec![0x30, 0x82, 0x00, 0x01, 0xff, name.len() as u8]),
        public_key_pem: format!("-----BEGIN PUBLIC KEY-----\n{name}\n-----END PUBLIC KEY-----\n"),
    }
}

fn assert_actor(got: &LocalActor, want: &NewActor) {
    assert_eq!(got.name, want.name);
    assert_eq!(got.display_name, want.display_name);
    assert_eq!(got.summary, want.summary);
    assert_eq!(
        got.manually_approves_followers,
        want.manually_approves_followers
    );
    assert_eq!(got.private_key.0, want.private_key.0);
    assert_eq!(got.public_key_pem, want.public_key_pem);
}

/// A remote follower `user` on `host`, with a shared inbox when given.
fn follower(host: &str, user: &str, shared: Option<&str>) -> Follower {
    Follower {
        actor: format!("https://{host}/users/{user}"),
        inbox: format!("https://{host}/users/{user}/inbox"),
        shared_inbox: shared.map(str::to_string),
        host: host.to_string(),
        follow_id: None,
    }
}

fn activity(key: &str, actor_id: i64, kind: &str, object: Option<&str>) -> NewActivity {
    NewActivity {
        key: key.to_string(),
        ap_id: format!("https://local.example/activities/{key}"),
        actor_id,
        kind: kind.to_string(),
        object_id: object.map(str::to_string),
        idempotency_key: None,
        body: serde_json::json!({
            "id": format!("https://local.example/activities/{key}"),
            "type": kind,
            "to": ["https://www.w3.org/ns/activitystreams#Public"],
            "bto": ["https://secret.example/users/b"],
            "object": {"content": "héllo", "n": 3, "tags": [], "sensitive": false, "x": null},
        }),
        delivered_body: format!("{{\"id\":\"{key}\"}}\u{0}").into_bytes(),
    }
}

/// Every delivery target of `actor_id`, page after page.
async fn all_targets(s: &dyn Store, actor_id: i64, page: u32) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let got = s
            .follower_targets(actor_id, out.last().map(String::as_str), page)
            .await
            .unwrap();
        assert!(got.len() <= page as usize, "{got:?} exceeds {page}");
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

async fn migrate_again_changes_nothing_and_ping_answers(cx: StoreCx) {
    let s = &*cx.store;
    s.ping().await.unwrap();
    let alice = s.create_actor(new_actor("alice")).await.unwrap();
    s.migrate().await.unwrap();
    s.migrate().await.unwrap();
    s.ping().await.unwrap();
    assert_eq!(s.actor_count().await.unwrap(), 1);
    assert_eq!(
        s.actor_by_id(alice.id).await.unwrap().unwrap().name,
        "alice"
    );
    assert_eq!(s.totals().await.unwrap(), Totals::default());
    assert!(s.paused_hosts().await.unwrap().is_empty());
    assert!(s.failing_hosts(10).await.unwrap().is_empty());
    assert!(s.dead_letters(10, None).await.unwrap().is_empty());
}

async fn create_actor_round_trips_and_refuses_a_taken_name(cx: StoreCx) {
    let s = &*cx.store;
    let want = NewActor {
        manually_approves_followers: true,
        ..new_actor("alice")
    };
    let alice = s.create_actor(want.clone()).await.unwrap();
    assert_actor(&alice, &want);

    let err = s
        .create_actor(NewActor {
            display_name: "Another Alice".into(),
            ..new_actor("alice")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(err.to_string(), "actor `alice` exists already");
    // The first one is untouched.
    assert_actor(&s.actor_by_name("alice").await.unwrap().unwrap(), &want);

    let bob = s.create_actor(new_actor("bob")).await.unwrap();
    assert_ne!(bob.id, alice.id);
    assert_eq!(s.actor_count().await.unwrap(), 2);
}

async fn ensure_actor_creates_once_even_when_racing(cx: StoreCx) {
    let s = &*cx.store;
    let first = new_actor("relay");
    let created = s.ensure_actor(first.clone()).await.unwrap();
    assert_actor(&created, &first);

    // Present: returned as it is, not replaced.
    let again = s
        .ensure_actor(NewActor {
            display_name: "other".into(),
            private_key: PrivateKey(vec![9, 9, 9]),
            ..new_actor("relay")
        })
        .await
        .unwrap();
    assert_eq!(again.id, created.id);
    assert_actor(&again, &first);

    // An actor created otherwise is returned too.
    let bob = s.create_actor(new_actor("bob")).await.unwrap();
    assert_eq!(s.ensure_actor(new_actor("bob")).await.unwrap().id, bob.id);

    // Several racing to create the same actor all get the one created.
    let racers = (0..6u8).map(|i| {
        s.ensure_actor(NewActor {
            private_key: PrivateKey(vec![i]),
            ..new_actor("raced")
        })
    });
    let raced: Vec<LocalActor> = futures::future::try_join_all(racers).await.unwrap();
    let stored = s.actor_by_name("raced").await.unwrap().unwrap();
    for r in &raced {
        assert_eq!(r.id, stored.id);
        assert_eq!(r.private_key.0, stored.private_key.0);
    }
    assert_eq!(s.actor_count().await.unwrap(), 3);
}

async fn actors_are_found_by_name_and_id_and_counted(cx: StoreCx) {
    let s = &*cx.store;
    assert_eq!(s.actor_count().await.unwrap(), 0);
    assert!(s.actor_by_name("alice").await.unwrap().is_none());
    let alice = s.create_actor(new_actor("alice")).await.unwrap();
    let bob = s.create_actor(new_actor("bob")).await.unwrap();
    assert_eq!(s.actor_count().await.unwrap(), 2);

    let by_name = s.actor_by_name("bob").await.unwrap().unwrap();
    assert_eq!(by_name.id, bob.id);
    assert_actor(&by_name, &new_actor("bob"));
    let by_id = s.actor_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!(by_id.id, alice.id);
    assert_actor(&by_id, &new_actor("alice"));

    assert!(s.actor_by_name("carol").await.unwrap().is_none());
    let unused = alice.id.max(bob.id) + 1000;
    assert!(s.actor_by_id(unused).await.unwrap().is_none());
}

async fn actor_ref_and_profile_read_the_actor_without_its_keys(cx: StoreCx) {
    let s = &*cx.store;
    assert!(s.actor_ref_by_name("alice").await.unwrap().is_none());
    let alice = s
        .create_actor(NewActor {
            manually_approves_followers: true,
            ..new_actor("alice")
        })
        .await
        .unwrap();
    let bob = s.create_actor(new_actor("bob")).await.unwrap();
    assert_eq!(
        s.actor_ref_by_name("alice").await.unwrap(),
        Some(ActorRef {
            id: alice.id,
            name: "alice".into(),
            manually_approves_followers: true,
        })
    );
    assert_eq!(
        s.actor_ref_by_name("bob").await.unwrap(),
        Some(bob.to_ref())
    );
    assert!(s.actor_ref_by_name("carol").await.unwrap().is_none());
    // Exact names only.
    assert!(s.actor_ref_by_name("Alice").await.unwrap().is_none());
    assert!(s.actor_ref_by_name("ali%").await.unwrap().is_none());
}

async fn delete_actor_removes_it_with_what_is_its_own(cx: StoreCx) {
    let s = &*cx.store;
    assert!(!s.delete_actor("alice").await.unwrap());
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let x = follower("r1.example", "x", Some("https://r1.example/inbox"));
    let y = follower("r2.example", "y", None);
    for actor in [alice, bob] {
        s.add_follower(actor, &x).await.unwrap();
        s.add_follow_request(actor, &y, &serde_json::json!({"type": "Follow"}))
            .await
            .unwrap();
    }
    s.insert_activity(activity("a1", alice, "Create", None))
        .await
        .unwrap();
    s.insert_activity(activity("b1", bob, "Create", None))
        .await
        .unwrap();
    s.record_delivered("a1", &x.inbox, "r1.example", 202, 3)
        .await
        .unwrap();
    s.record_delivered("b1", &x.inbox, "r1.example", 202, 3)
        .await
        .unwrap();

    assert!(s.delete_actor("alice").await.unwrap());
    assert!(s.actor_by_name("alice").await.unwrap().is_none());
    assert!(s.actor_ref_by_name("alice").await.unwrap().is_none());
    assert!(s.actor_by_id(alice).await.unwrap().is_none());
    assert_eq!(s.follower_count(alice).await.unwrap(), 0);
    assert!(s
        .take_follow_request(alice, &y.actor)
        .await
        .unwrap()
        .is_none());
    assert!(s.activity("a1").await.unwrap().is_none());
    assert!(!s.delivered("a1", &x.inbox).await.unwrap());
    assert_eq!(s.actor_count().await.unwrap(), 1);
    // Gone once.
    assert!(!s.delete_actor("alice").await.unwrap());

    // Bob's are untouched.
    assert_eq!(s.follower_count(bob).await.unwrap(), 1);
    assert!(s
        .take_follow_request(bob, &y.actor)
        .await
        .unwrap()
        .is_some());
    assert!(s.activity("b1").await.unwrap().is_some());
    assert!(s.delivered("b1", &x.inbox).await.unwrap());

    // The name can be taken again, by a new actor.
    let again = s.create_actor(new_actor("alice")).await.unwrap();
    assert_ne!(again.id, alice);
    assert_eq!(s.follower_count(again.id).await.unwrap(), 0);
}

async fn add_follower_adds_refreshes_and_remove_follower_removes(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let x = Follower {
        follow_id: Some("https://r1.example/follows/1".into()),
        ..follower("r1.example", "x", Some("https://r1.example/inbox"))
    };
    s.add_follower(alice, &x).await.unwrap();
    s.add_follower(alice, &x).await.unwrap();
    assert_eq!(s.follower_count(alice).await.unwrap(), 1, "added once");
    assert_eq!(s.follower_count(bob).await.unwrap(), 0);
    s.add_follower(bob, &x).await.unwrap();
    assert_eq!(s.follower_count(bob).await.unwrap(), 1);

    // Refreshed: its inboxes are replaced.
    let moved = Follower {
        inbox: "https://r1.example/users/x/new-inbox".into(),
        shared_inbox: None,
        ..x.clone()
    };
    s.add_follower(alice, &moved).await.unwrap();
    assert_eq!(s.follower_count(alice).await.unwrap(), 1);
    assert_eq!(
        s.follower_targets(alice, None, 10).await.unwrap(),
        std::slice::from_ref(&moved.inbox)
    );
    assert_eq!(
        s.follower_targets(bob, None, 10).await.unwrap(),
        ["https://r1.example/inbox"],
        "another actor's follow is untouched"
    );

    assert!(s.remove_follower(alice, &x.actor).await.unwrap());
    assert!(!s.remove_follower(alice, &x.actor).await.unwrap());
    assert!(!s
        .remove_follower(alice, "https://r1.example/users/nobody")
        .await
        .unwrap());
    assert_eq!(s.follower_count(alice).await.unwrap(), 0);
    assert!(s
        .follower_targets(alice, None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.follower_count(bob).await.unwrap(), 1);
}

async fn add_followers_adds_many_and_keeps_existing_ones(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let x = follower("a.example", "x", None);
    s.add_follower(alice, &x).await.unwrap();
    s.add_followers(alice, &[]).await.unwrap();

    // More than one chunk of either implementation, `x` among them with
    // other inboxes.
    let mut many: Vec<Follower> = (0..10_001)
        .map(|i| follower(&format!("h{}.example", i % 7), &format!("u{i}"), None))
        .collect();
    many.push(Follower {
        inbox: "https://a.example/elsewhere".into(),
        shared_inbox: Some("https://a.example/inbox".into()),
        ..x.clone()
    });
    s.add_followers(alice, &many).await.unwrap();
    assert_eq!(s.follower_count(alice).await.unwrap(), 10_002);
    // Adding them again adds nothing.
    s.add_followers(alice, &many[..100]).await.unwrap();
    assert_eq!(s.follower_count(alice).await.unwrap(), 10_002);

    let targets = all_targets(s, alice, 5000).await;
    assert_eq!(targets.len(), 10_002);
    assert!(targets.contains(&x.inbox), "the existing follow is kept");
    assert!(!targets.contains(&"https://a.example/inbox".to_string()));
    assert!(!targets.contains(&"https://a.example/elsewhere".to_string()));

    // A follow added in bulk keeps its Follow's id: an Undo naming only
    // that id removes it.
    let y = Follower {
        follow_id: Some("https://b.example/follows/1".into()),
        ..follower("b.example", "y", None)
    };
    s.add_followers(alice, std::slice::from_ref(&y))
        .await
        .unwrap();
    assert_eq!(s.follower_count(alice).await.unwrap(), 10_003);
    assert_eq!(
        s.remove_follow_by_id(&y.actor, "https://b.example/follows/1")
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.follower_count(alice).await.unwrap(), 10_002);
}

async fn follower_targets_are_distinct_shared_inboxes_in_pages(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    assert!(s
        .follower_targets(alice, None, 10)
        .await
        .unwrap()
        .is_empty());
    // Targets that sort the same in any collation.
    let shared_b = "https://b.example/inbox";
    let shared_d = "https://d.example/inbox";
    for f in [
        follower("b.example", "b1", Some(shared_b)),
        follower("b.example", "b2", Some(shared_b)),
        follower("b.example", "b3", Some(shared_b)),
        follower("c.example", "c1", None),
        follower("a.example", "a1", None),
        follower("d.example", "d1", Some(shared_d)),
        follower("e.example", "e1", None),
    ] {
        s.add_follower(alice, &f).await.unwrap();
    }
    s.add_follower(bob, &follower("z.example", "z1", None))
        .await
        .unwrap();
    assert_eq!(s.follower_count(alice).await.unwrap(), 7);

    let want = [
        "https://a.example/users/a1/inbox",
        shared_b,
        "https://c.example/users/c1/inbox",
        shared_d,
        "https://e.example/users/e1/inbox",
    ];
    assert_eq!(s.follower_targets(alice, None, 100).await.unwrap(), want);
    // Strictly after `after`, at most `limit`.
    assert_eq!(
        s.follower_targets(alice, Some(shared_b), 2).await.unwrap(),
        want[2..4]
    );
    assert_eq!(
        s.follower_targets(alice, Some("https://b.example/"), 100)
            .await
            .unwrap(),
        want[1..]
    );
    assert!(s
        .follower_targets(alice, Some(want[4]), 100)
        .await
        .unwrap()
        .is_empty());
    for page in [1, 2, 3] {
        assert_eq!(all_targets(s, alice, page).await, want, "pages of {page}");
    }
    assert_eq!(
        s.follower_targets(bob, None, 100).await.unwrap(),
        ["https://z.example/users/z1/inbox"]
    );
}

/// Every follower id of `actor_id` starting with `prefix`, page after page.
async fn all_ids(s: &dyn Store, actor_id: i64, prefix: &str, page: u32) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let got = s
            .follower_ids(actor_id, prefix, out.last().map(String::as_str), page)
            .await
            .unwrap();
        assert!(got.len() <= page as usize, "{got:?} exceeds {page}");
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

async fn follower_ids_are_keyset_pages_filtered_by_prefix(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let mut want = Vec::new();
    for (host, user) in [
        ("a.example", "1"),
        ("a.example", "2"),
        ("a.example", "Zed"),
        ("a.example:8443", "3"),
        ("a.example.evil", "4"),
        ("b.example", "5"),
        ("b.example", "6"),
    ] {
        let f = follower(host, user, Some(&format!("https://{host}/inbox")));
        s.add_follower(alice, &f).await.unwrap();
        want.push(f.actor);
    }
    s.add_follower(bob, &follower("a.example", "bobs", None))
        .await
        .unwrap();
    // Every id once, whatever the page size, in the same order each time.
    let all = all_ids(s, alice, "", 100).await;
    for page in [1, 2, 3] {
        assert_eq!(all_ids(s, alice, "", page).await, all, "page {page}");
    }
    let mut sorted = all.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want);
    // A partial collection: exactly the ids of that scheme and authority.
    let mut a = all_ids(s, alice, "https://a.example/", 2).await;
    a.sort();
    assert_eq!(
        a,
        [
            "https://a.example/users/1",
            "https://a.example/users/2",
            "https://a.example/users/Zed"
        ]
    );
    assert_eq!(
        all_ids(s, alice, "https://a.example:8443/", 10).await,
        ["https://a.example:8443/users/3"]
    );
    assert!(all_ids(s, alice, "http://a.example/", 10).await.is_empty());
    assert!(all_ids(s, alice, "https://%.example/", 10).await.is_empty());
    assert_eq!(
        all_ids(s, bob, "", 10).await,
        ["https://a.example/users/bobs"]
    );
    // After the last one, nothing; a cursor that is no id still pages.
    let last = all.last().unwrap();
    assert!(s
        .follower_ids(alice, "", Some(last), 10)
        .await
        .unwrap()
        .is_empty());
    let from_a = s
        .follower_ids(
            alice,
            "https://a.example/",
            Some("https://a.example/users/10"),
            10,
        )
        .await
        .unwrap();
    assert!(
        from_a.contains(&"https://a.example/users/2".to_string()),
        "{from_a:?}"
    );
    assert!(
        !from_a.contains(&"https://a.example/users/1".to_string()),
        "{from_a:?}"
    );
}

/// The digest of `actor_id`'s followers on `authority`, from the ids.
async fn digest_from_ids(
    s: &dyn Store,
    actor_id: i64,
    authority: &str,
) -> stampede_core::followers_sync::Digest {
    let ids = all_ids(s, actor_id, &format!("{authority}/"), 1000).await;
    stampede_core::followers_sync::Digest::of_ids(ids.iter().map(String::as_str))
}

/// Asserts that the stored digests of `actor_id` are those of its followers.
async fn assert_digests(s: &dyn Store, actor_id: i64, authorities: &[&str]) {
    let names: Vec<String> = authorities.iter().map(|a| a.to_string()).collect();
    let got = s.follower_digests(actor_id, &names).await.unwrap();
    for (a, d) in authorities.iter().zip(got) {
        assert_eq!(d, digest_from_ids(s, actor_id, a).await, "{a}");
    }
}

async fn follower_digests_are_computed_once_then_kept_by_every_change(cx: StoreCx) {
    use stampede_core::followers_sync::Digest;
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    // FEP-8fcf's example: https://example.org/users/1's followers, and
    // their digest for the server of https://testing.example.org/users/1.
    let fep = |id: &str| Follower {
        actor: id.to_string(),
        inbox: format!("{id}/inbox"),
        shared_inbox: None,
        host: id.split('/').nth(2).unwrap_or_default().to_string(),
        follow_id: Some(format!("{id}/follow")),
    };
    for id in [
        "https://example.org/users/2",
        "https://testing.example.org/users/1",
        "https://next.example.org/users/foo",
        "https://testing.example.org/users/2",
    ] {
        s.add_follower(alice, &fep(id)).await.unwrap();
    }
    s.add_follower(alice, &follower("c.example:8443", "c", None))
        .await
        .unwrap();
    s.add_follower(bob, &fep("https://testing.example.org/users/3"))
        .await
        .unwrap();
    let testing = "https://testing.example.org".to_string();
    let got = s
        .follower_digests(alice, &[testing.clone(), "https://nobody.example".into()])
        .await
        .unwrap();
    assert_eq!(
        got[0].hex(),
        "c33f48cd341ef046a206b8a72ec97af65079f9a3a9b90eef79c5920dce45c61f"
    );
    assert_eq!(got[1], Digest::default());
    let authorities = [
        "https://testing.example.org",
        "https://example.org",
        "https://next.example.org",
        "https://c.example:8443",
        "https://d.example",
        "https://bulk.example",
    ];
    assert_digests(s, alice, &authorities).await;
    // Every way a follow comes or goes keeps them, for alice only.
    s.add_follower(alice, &fep("https://testing.example.org/users/9"))
        .await
        .unwrap();
    assert_digests(s, alice, &authorities).await;
    // Refreshed, not added twice.
    s.add_follower(alice, &fep("https://testing.example.org/users/9"))
        .await
        .unwrap();
    assert_digests(s, alice, &authorities).await;
    s.add_followers(
        alice,
        &[
            follower("bulk.example", "b1", None),
            follower("bulk.example", "b2", None),
            fep("https://testing.example.org/users/1"),
        ],
    )
    .await
    .unwrap();
    assert_digests(s, alice, &authorities).await;
    assert!(s
        .remove_follower(alice, "https://testing.example.org/users/2")
        .await
        .unwrap());
    assert_digests(s, alice, &authorities).await;
    assert_eq!(
        s.remove_follow_by_id(
            "https://testing.example.org/users/9",
            "https://testing.example.org/users/9/follow"
        )
        .await
        .unwrap(),
        1
    );
    assert_digests(s, alice, &authorities).await;
    assert_eq!(
        s.remove_followers_by_inbox("https://bulk.example/users/b1/inbox")
            .await
            .unwrap(),
        1
    );
    assert_digests(s, alice, &authorities).await;
    s.update_follower_inboxes(
        "https://bulk.example/users/b2",
        "https://d.example/x/inbox",
        None,
        "d.example",
    )
    .await
    .unwrap();
    assert_digests(s, alice, &authorities).await;
    assert_eq!(
        s.remove_follower_everywhere("https://example.org/users/2")
            .await
            .unwrap(),
        1
    );
    assert_digests(s, alice, &authorities).await;
    assert_eq!(
        s.forget_hosts(&["c.example:8443".to_string()], &[])
            .await
            .unwrap(),
        1
    );
    assert_digests(s, alice, &authorities).await;
    // The last one gone: zero again.
    for id in [
        "https://testing.example.org/users/1",
        "https://next.example.org/users/foo",
        "https://bulk.example/users/b2",
    ] {
        assert!(s.remove_follower(alice, id).await.unwrap());
    }
    let zeros = s
        .follower_digests(alice, &authorities.map(String::from))
        .await
        .unwrap();
    assert!(zeros.iter().all(|d| *d == Digest::default()), "{zeros:?}");
    // Bob's, first computed now, hold what happened before.
    assert_eq!(
        s.follower_digests(bob, std::slice::from_ref(&testing))
            .await
            .unwrap(),
        [Digest::of_id("https://testing.example.org/users/3")]
    );
    // A deleted actor takes its digests with it; the others keep theirs.
    assert!(s.delete_actor("alice").await.unwrap());
    s.add_follower(bob, &fep("https://testing.example.org/users/4"))
        .await
        .unwrap();
    assert_digests(s, bob, &["https://testing.example.org"]).await;
    assert!(s.delete_actor("bob").await.unwrap());
}

async fn follower_digests_first_computed_while_follows_race_are_exact(cx: StoreCx) {
    let store = cx.store.clone();
    let alice = store.create_actor(new_actor("alice")).await.unwrap().id;
    for i in 0..50 {
        store
            .add_follower(alice, &follower("race.example", &format!("old{i}"), None))
            .await
            .unwrap();
    }
    // Follows come and go while the digests are first computed.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 4 == 0 {
                s.remove_follower(alice, &format!("https://race.example/users/old{i}"))
                    .await
                    .map(|_| ())
            } else {
                s.add_follower(alice, &follower("race.example", &format!("new{i}"), None))
                    .await
            }
        }));
    }
    let first = {
        let s = store.clone();
        tokio::spawn(async move {
            s.follower_digests(alice, &["https://race.example".to_string()])
                .await
        })
    };
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    first.await.unwrap().unwrap();
    assert_digests(&*store, alice, &["https://race.example"]).await;
}

async fn remove_follow_by_id_removes_only_that_follow(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let x = follower("r.example", "x", None);
    let y = follower("r.example", "y", None);
    let with_id = |f: &Follower, id: &str| Follower {
        follow_id: Some(id.to_string()),
        ..f.clone()
    };
    s.add_follower(alice, &with_id(&x, "https://r.example/f/1"))
        .await
        .unwrap();
    s.add_follower(bob, &with_id(&x, "https://r.example/f/2"))
        .await
        .unwrap();
    s.add_follower(alice, &with_id(&y, "https://r.example/f/3"))
        .await
        .unwrap();

    assert_eq!(
        s.remove_follow_by_id(&x.actor, "https://r.example/f/9")
            .await
            .unwrap(),
        0
    );
    // Another follower's Follow id does not match.
    assert_eq!(
        s.remove_follow_by_id(&y.actor, "https://r.example/f/1")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.remove_follow_by_id(&x.actor, "https://r.example/f/1")
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.follower_count(alice).await.unwrap(), 1);
    assert_eq!(s.follower_count(bob).await.unwrap(), 1);
    assert_eq!(
        s.follower_targets(alice, None, 10).await.unwrap(),
        std::slice::from_ref(&y.inbox)
    );
    assert_eq!(
        s.remove_follow_by_id(&x.actor, "https://r.example/f/1")
            .await
            .unwrap(),
        0
    );
}

async fn remove_followers_by_inbox_matches_personal_and_shared_inboxes(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let shared = "https://gone.example/inbox";
    let g1 = follower("gone.example", "g1", Some(shared));
    let g2 = follower("gone.example", "g2", Some(shared));
    let p = follower("personal.example", "p", None);
    let keep = follower("kept.example", "k", Some("https://kept.example/inbox"));
    for f in [&g1, &g2, &p, &keep] {
        s.add_follower(alice, f).await.unwrap();
    }
    s.add_follower(bob, &g1).await.unwrap();

    assert_eq!(s.remove_followers_by_inbox(shared).await.unwrap(), 3);
    assert_eq!(s.remove_followers_by_inbox(&p.inbox).await.unwrap(), 1);
    assert_eq!(s.remove_followers_by_inbox(&p.inbox).await.unwrap(), 0);
    assert_eq!(s.follower_count(alice).await.unwrap(), 1);
    assert_eq!(s.follower_count(bob).await.unwrap(), 0);
    assert_eq!(
        s.follower_targets(alice, None, 10).await.unwrap(),
        ["https://kept.example/inbox"]
    );
}

async fn remove_follower_everywhere_removes_every_follow(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let x = follower("r.example", "x", None);
    let y = follower("r.example", "y", None);
    s.add_follower(alice, &x).await.unwrap();
    s.add_follower(bob, &x).await.unwrap();
    s.add_follower(alice, &y).await.unwrap();

    assert_eq!(s.remove_follower_everywhere(&x.actor).await.unwrap(), 2);
    assert_eq!(s.remove_follower_everywhere(&x.actor).await.unwrap(), 0);
    assert_eq!(s.follower_count(alice).await.unwrap(), 1);
    assert_eq!(s.follower_count(bob).await.unwrap(), 0);
    assert!(!s.remove_follower(alice, &x.actor).await.unwrap());
    assert!(s.remove_follower(alice, &y.actor).await.unwrap());
}

async fn update_follower_inboxes_moves_every_follow(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let x = follower("old.example", "x", Some("https://old.example/inbox"));
    let y = follower("old.example", "y", Some("https://old.example/inbox"));
    s.add_follower(alice, &x).await.unwrap();
    s.add_follower(bob, &x).await.unwrap();
    s.add_follower(alice, &y).await.unwrap();

    let n = s
        .update_follower_inboxes(
            &x.actor,
            "https://new.example/users/x/inbox",
            Some("https://new.example/inbox"),
            "new.example",
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        s.follower_targets(alice, None, 10).await.unwrap(),
        ["https://new.example/inbox", "https://old.example/inbox"]
    );
    assert_eq!(
        s.follower_targets(bob, None, 10).await.unwrap(),
        ["https://new.example/inbox"]
    );
    // Without a shared inbox, the personal one is the target.
    s.update_follower_inboxes(
        &x.actor,
        "https://new.example/users/x/inbox",
        None,
        "new.example",
    )
    .await
    .unwrap();
    assert_eq!(
        s.follower_targets(bob, None, 10).await.unwrap(),
        ["https://new.example/users/x/inbox"]
    );
    assert_eq!(
        s.update_follower_inboxes("https://nobody.example/u", "https://n/i", None, "n")
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.follower_count(alice).await.unwrap(), 2);
}

async fn follow_requests_are_replaced_and_taken_once(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let x = follower("r.example", "x", Some("https://r.example/inbox"));
    let follow = |n: u32| {
        serde_json::json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("https://r.example/follows/{n}"),
            "type": "Follow",
            "actor": x.actor,
            "object": "https://local.example/users/alice",
            "n": n,
            "nested": {"list": [1, "two", null, true], "ü": "ö"},
        })
    };
    assert!(s
        .take_follow_request(alice, &x.actor)
        .await
        .unwrap()
        .is_none());
    s.add_follow_request(alice, &x, &follow(1)).await.unwrap();
    // A pending request is not a follow.
    assert_eq!(s.follower_count(alice).await.unwrap(), 0);
    assert!(s
        .take_follow_request(bob, &x.actor)
        .await
        .unwrap()
        .is_none());

    // A second request replaces the first.
    let moved = Follower {
        inbox: "https://r.example/users/x/inbox2".into(),
        shared_inbox: None,
        ..x.clone()
    };
    s.add_follow_request(alice, &moved, &follow(2))
        .await
        .unwrap();
    let (f, body) = s
        .take_follow_request(alice, &x.actor)
        .await
        .unwrap()
        .expect("the pending request");
    assert_eq!(
        f,
        Follower {
            follow_id: Some("https://r.example/follows/2".into()),
            ..moved
        }
    );
    assert_eq!(body, follow(2));
    assert!(s
        .take_follow_request(alice, &x.actor)
        .await
        .unwrap()
        .is_none());
}

async fn remote_actors_are_stored_refreshed_and_forgotten(cx: StoreCx) {
    let s = &*cx.store;
    let id = "https://r.example/users/x";
    assert!(s.remote_actor(id).await.unwrap().is_none());
    let a = RemoteActor {
        id: id.into(),
        inbox: format!("{id}/inbox"),
        shared_inbox: Some("https://r.example/inbox".into()),
        key_id: Some(format!("{id}#main-key")),
        public_key_pem: Some("-----BEGIN PUBLIC KEY-----\nx\n".into()),
    };
    s.put_remote_actor(&a).await.unwrap();
    assert_eq!(s.remote_actor(id).await.unwrap(), Some(a.clone()));

    let refreshed = RemoteActor {
        inbox: "https://other.example/x/inbox".into(),
        shared_inbox: None,
        key_id: None,
        public_key_pem: None,
        ..a.clone()
    };
    s.put_remote_actor(&refreshed).await.unwrap();
    assert_eq!(s.remote_actor(id).await.unwrap(), Some(refreshed));

    let other = RemoteActor {
        id: "https://r.example/users/y".into(),
        ..a.clone()
    };
    s.put_remote_actor(&other).await.unwrap();
    s.delete_remote_actor(id).await.unwrap();
    assert!(s.remote_actor(id).await.unwrap().is_none());
    s.delete_remote_actor(id).await.unwrap();
    assert_eq!(s.remote_actor(&other.id).await.unwrap(), Some(other));
}

async fn remote_keys_are_stored_replaced_and_forgotten_by_owner(cx: StoreCx) {
    let s = &*cx.store;
    let key = |owner: &str, n: u32, pem: &str| RemoteKey {
        key_id: format!("{owner}#key-{n}"),
        owner: owner.to_string(),
        public_key_pem: pem.to_string(),
    };
    let x = "https://r.example/users/x";
    let y = "https://r.example/users/y";
    assert!(s.remote_key(&key(x, 1, "").key_id).await.unwrap().is_none());
    let (x1, x2, y1) = (
        key(x, 1, "pem x1"),
        key(x, 2, "pem x2"),
        key(y, 1, "pem y1"),
    );
    for k in [&x1, &x2, &y1] {
        s.put_remote_key(k).await.unwrap();
    }
    assert_eq!(s.remote_key(&x1.key_id).await.unwrap(), Some(x1.clone()));
    assert_eq!(s.remote_key(&y1.key_id).await.unwrap(), Some(y1.clone()));

    let rotated = key(x, 1, "pem x1 rotated");
    s.put_remote_key(&rotated).await.unwrap();
    assert_eq!(s.remote_key(&x1.key_id).await.unwrap(), Some(rotated));

    s.delete_remote_keys_of(x).await.unwrap();
    assert!(s.remote_key(&x1.key_id).await.unwrap().is_none());
    assert!(s.remote_key(&x2.key_id).await.unwrap().is_none());
    assert_eq!(s.remote_key(&y1.key_id).await.unwrap(), Some(y1));
    s.delete_remote_keys_of(x).await.unwrap();
}

async fn insert_activity_is_idempotent_by_idempotency_key(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let with_key = |key: &str, actor: i64, idem: &str| NewActivity {
        idempotency_key: Some(idem.to_string()),
        ..activity(key, actor, "Create", Some("https://local.example/notes/1"))
    };
    let first = with_key("k1", alice, "idem-1");
    let first_ap_id = first.ap_id.clone();
    assert_eq!(
        s.insert_activity(first).await.unwrap(),
        Inserted {
            key: "k1".into(),
            ap_id: first_ap_id.clone(),
            created: true,
            enqueued: false,
        }
    );
    // The same idempotency key again: the first activity, not a new one.
    let existing = Inserted {
        key: "k1".into(),
        ap_id: first_ap_id.clone(),
        created: false,
        enqueued: false,
    };
    assert_eq!(
        s.insert_activity(with_key("k2", alice, "idem-1"))
            .await
            .unwrap(),
        existing
    );
    assert!(s.activity("k2").await.unwrap().is_none());
    s.mark_enqueued("k1").await.unwrap();
    s.mark_enqueued("k1").await.unwrap();
    assert_eq!(
        s.insert_activity(with_key("k3", alice, "idem-1"))
            .await
            .unwrap(),
        Inserted {
            enqueued: true,
            ..existing
        }
    );
    assert_eq!(s.activity_count(alice).await.unwrap(), 1);

    // Idempotency keys are per actor.
    let bobs = s
        .insert_activity(with_key("k4", bob, "idem-1"))
        .await
        .unwrap();
    assert!(bobs.created && !bobs.enqueued && bobs.key == "k4");
    // Without an idempotency key, every insert creates.
    for key in ["k5", "k6"] {
        let r = s
            .insert_activity(activity(key, alice, "Create", None))
            .await
            .unwrap();
        assert_eq!((r.key.as_str(), r.created, r.enqueued), (key, true, false));
    }
    assert_eq!(s.activity_count(alice).await.unwrap(), 3);
    assert_eq!(s.activity_count(bob).await.unwrap(), 1);
}

async fn activities_read_back_with_their_author_and_count(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    assert!(s.activity("k1").await.unwrap().is_none());
    assert_eq!(s.activity_count(alice).await.unwrap(), 0);

    let a = activity("k1", alice, "Announce", Some("https://r.example/notes/9"));
    s.insert_activity(a.clone()).await.unwrap();
    s.insert_activity(activity("k2", bob, "Create", None))
        .await
        .unwrap();
    let got = s.activity("k1").await.unwrap().expect("stored");
    assert_eq!(got.key, "k1");
    assert_eq!(got.ap_id, a.ap_id);
    assert_eq!(got.kind, "Announce");
    assert_eq!(got.actor_id, alice);
    assert_eq!(got.actor_name, "alice");
    assert_eq!(got.body, a.body);
    assert_eq!(got.delivered_body, a.delivered_body);
    assert_eq!(s.activity("k2").await.unwrap().unwrap().actor_name, "bob");
    assert_eq!(s.activity_count(alice).await.unwrap(), 1);
    assert_eq!(s.activity_count(bob).await.unwrap(), 1);
}

async fn mark_fanned_out_records_the_targets(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    s.insert_activity(activity("k2", alice, "Create", None))
        .await
        .unwrap();
    s.mark_enqueued("k1").await.unwrap();
    s.mark_fanned_out("k1", 42).await.unwrap();
    // The activity reads the same.
    let got = s.activity("k1").await.unwrap().unwrap();
    assert_eq!(got.kind, "Create");
    assert_eq!(got.actor_name, "alice");
    // Not read back by the trait: straight from the database, where only
    // the activity named is marked.
    let row = cx
        .close_and_read(
            "SELECT (SELECT targets FROM activities WHERE key = 'k1' AND fanned_out_at IS NOT NULL),
                    (SELECT count(*) FROM activities WHERE fanned_out_at IS NOT NULL)",
        )
        .await;
    assert_eq!(row, [Some(42), Some(1)]);
}

async fn deliveries_are_recorded_once(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    s.insert_activity(activity("k2", alice, "Create", None))
        .await
        .unwrap();
    let inbox = "https://r.example/inbox";
    assert!(!s.delivered("k1", inbox).await.unwrap());
    s.record_delivered("k1", inbox, "r.example", 202, 3)
        .await
        .unwrap();
    assert!(s.delivered("k1", inbox).await.unwrap());
    assert!(!s.delivered("k2", inbox).await.unwrap());
    assert!(!s
        .delivered("k1", "https://r.example/users/x/inbox")
        .await
        .unwrap());
    // Recorded again (a redelivered job): still one delivery.
    s.record_delivered("k1", inbox, "r.example", 200, 4)
        .await
        .unwrap();
    assert!(s.delivered("k1", inbox).await.unwrap());
    assert_eq!(s.totals().await.unwrap().delivered, 1);
}

async fn dead_letters_list_newest_first_and_replay_oldest_first(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let a1 = activity("k1", alice, "Create", None);
    let a2 = activity("k2", alice, "Create", None);
    s.insert_activity(a1.clone()).await.unwrap();
    s.insert_activity(a2.clone()).await.unwrap();
    assert!(s.dead_letters(10, None).await.unwrap().is_empty());
    assert!(s
        .dead_letters_to_replay(None, None, 10)
        .await
        .unwrap()
        .is_empty());

    let first_ms = now_ms() - 3_600_123;
    let dead = |key: &str, host: &str, reason: &str, status: Option<u16>, attempts| NewDeadLetter {
        activity_key: key.to_string(),
        inbox: format!("https://{host}/inbox"),
        host: host.to_string(),
        reason: reason.to_string(),
        last_status: status,
        attempts,
        first_attempt_unix_ms: first_ms,
    };
    let before = now_ms();
    s.add_dead_letter(dead("k1", "h1.example", "410 Gone", Some(410), 1))
        .await
        .unwrap();
    s.add_dead_letter(dead("k2", "h2.example", "timed out", None, 7))
        .await
        .unwrap();
    s.add_dead_letter(dead("k1", "h1.example", "refused", Some(403), 2))
        .await
        .unwrap();
    let after = now_ms();

    let listed = s.dead_letters(10, None).await.unwrap();
    let reasons: Vec<&str> = listed.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        reasons,
        ["refused", "timed out", "410 Gone"],
        "newest first"
    );
    let (d3, d2, d1) = (&listed[0], &listed[1], &listed[2]);
    assert_eq!(d1.activity_id, a1.ap_id);
    assert_eq!(d1.activity_key, "k1");
    assert_eq!(d1.inbox, "https://h1.example/inbox");
    assert_eq!(d1.host, "h1.example");
    assert_eq!(d1.last_status, Some(410));
    assert_eq!(d1.attempts, 1);
    assert_eq!(d1.first_attempt_unix_ms, first_ms);
    assert_eq!(d2.activity_id, a2.ap_id);
    assert_eq!((d2.last_status, d2.attempts), (None, 7));
    assert_eq!((d3.last_status, d3.attempts), (Some(403), 2));
    for d in &listed {
        assert!(
            (before - 1000..=after + 1000).contains(&d.last_attempt_unix_ms),
            "last attempt {} not within [{before}, {after}]",
            d.last_attempt_unix_ms
        );
    }
    let ids = |v: &[stampede_backends::store::DeadLetter]| -> Vec<i64> {
        v.iter().map(|d| d.id).collect()
    };
    assert_eq!(
        ids(&s.dead_letters(10, Some("h1.example")).await.unwrap()),
        [d3.id, d1.id]
    );
    assert_eq!(ids(&s.dead_letters(1, None).await.unwrap()), [d3.id]);
    assert!(s
        .dead_letters(10, Some("h9.example"))
        .await
        .unwrap()
        .is_empty());

    // To replay: oldest first, by id, by host, or every one.
    let replay = s.dead_letters_to_replay(None, None, 10).await.unwrap();
    assert_eq!(ids(&replay), [d1.id, d2.id, d3.id]);
    assert_eq!(replay[0].reason, "410 Gone");
    assert_eq!(replay[0].first_attempt_unix_ms, first_ms);
    assert_eq!(
        ids(&s.dead_letters_to_replay(None, None, 2).await.unwrap()),
        [d1.id, d2.id]
    );
    assert_eq!(
        ids(&s
            .dead_letters_to_replay(None, Some("h2.example"), 10)
            .await
            .unwrap()),
        [d2.id]
    );
    assert_eq!(
        ids(&s
            .dead_letters_to_replay(Some(d3.id), None, 10)
            .await
            .unwrap()),
        [d3.id]
    );
    assert_eq!(s.totals().await.unwrap().dead_letters, 3);

    // Replayed ones are no longer listed, nor counted.
    s.mark_replayed(&[]).await.unwrap();
    s.mark_replayed(&[d1.id, d2.id]).await.unwrap();
    assert_eq!(ids(&s.dead_letters(10, None).await.unwrap()), [d3.id]);
    assert_eq!(
        ids(&s.dead_letters_to_replay(None, None, 10).await.unwrap()),
        [d3.id]
    );
    assert!(s
        .dead_letters_to_replay(Some(d1.id), None, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .dead_letters(10, Some("h2.example"))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.totals().await.unwrap().dead_letters, 1);
}

async fn hosts_are_paused_and_resumed(cx: StoreCx) {
    let s = &*cx.store;
    assert!(s.paused_hosts().await.unwrap().is_empty());
    s.set_host_paused("b.example", true).await.unwrap();
    s.set_host_paused("a.example:8443", true).await.unwrap();
    s.set_host_paused("a.example:8443", true).await.unwrap();
    s.set_host_paused("c.example", false).await.unwrap();
    let mut paused = s.paused_hosts().await.unwrap();
    paused.sort();
    assert_eq!(paused, ["a.example:8443", "b.example"]);

    s.set_host_paused("b.example", false).await.unwrap();
    assert_eq!(s.paused_hosts().await.unwrap(), ["a.example:8443"]);
    s.set_host_paused("b.example", true).await.unwrap();
    let mut paused = s.paused_hosts().await.unwrap();
    paused.sort();
    assert_eq!(paused, ["a.example:8443", "b.example"]);
}

async fn host_health_is_recorded_and_cleared(cx: StoreCx) {
    let s = &*cx.store;
    assert!(s.failing_hosts(10).await.unwrap().is_empty());
    let now = now_ms();
    let slow = HostHealth {
        host: "slow.example".into(),
        failing_since_unix_ms: now - 5_000,
        failures: 3,
        open_until_unix_ms: now + 60_000,
        unavailable: false,
    };
    let dead = HostHealth {
        host: "dead.example:8443".into(),
        failing_since_unix_ms: now - 90_000,
        failures: 40,
        open_until_unix_ms: 0,
        unavailable: true,
    };
    s.set_host_health(&slow.host, Some(&slow)).await.unwrap();
    s.set_host_health(&dead.host, Some(&dead)).await.unwrap();
    // Longest failing first, at most `limit`.
    assert_eq!(
        s.failing_hosts(10).await.unwrap(),
        [dead.clone(), slow.clone()]
    );
    assert_eq!(
        s.failing_hosts(1).await.unwrap(),
        std::slice::from_ref(&dead)
    );

    let worse = HostHealth {
        failures: 4,
        open_until_unix_ms: now + 120_000,
        unavailable: true,
        ..slow.clone()
    };
    s.set_host_health(&slow.host, Some(&worse)).await.unwrap();
    assert_eq!(
        s.failing_hosts(10).await.unwrap(),
        [dead.clone(), worse.clone()]
    );

    // Recovered: no longer failing.
    s.set_host_health(&dead.host, None).await.unwrap();
    s.set_host_health("never-failed.example", None)
        .await
        .unwrap();
    assert_eq!(
        s.failing_hosts(10).await.unwrap(),
        std::slice::from_ref(&worse)
    );

    // Pausing and health are independent.
    s.set_host_paused(&slow.host, true).await.unwrap();
    assert_eq!(s.failing_hosts(10).await.unwrap(), [worse]);
    s.set_host_health(&slow.host, None).await.unwrap();
    assert!(s.failing_hosts(10).await.unwrap().is_empty());
    assert_eq!(
        s.paused_hosts().await.unwrap(),
        std::slice::from_ref(&slow.host)
    );
    // A host failing again starts a new run.
    s.set_host_health(&dead.host, Some(&dead)).await.unwrap();
    assert_eq!(s.failing_hosts(10).await.unwrap(), [dead]);
    assert_eq!(s.paused_hosts().await.unwrap(), [slow.host]);
}

async fn object_deleted_only_by_a_delete_of_that_actor(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let note = "https://local.example/notes/1";
    assert!(!s.object_deleted(alice, note).await.unwrap());
    s.insert_activity(activity("k1", alice, "Create", Some(note)))
        .await
        .unwrap();
    s.insert_activity(activity("k2", alice, "Update", Some(note)))
        .await
        .unwrap();
    assert!(!s.object_deleted(alice, note).await.unwrap());
    s.insert_activity(activity("k3", bob, "Delete", Some(note)))
        .await
        .unwrap();
    assert!(!s.object_deleted(alice, note).await.unwrap());
    assert!(s.object_deleted(bob, note).await.unwrap());
    s.insert_activity(activity("k4", alice, "Delete", Some(note)))
        .await
        .unwrap();
    assert!(s.object_deleted(alice, note).await.unwrap());
    assert!(!s
        .object_deleted(alice, "https://local.example/notes/2")
        .await
        .unwrap());
}

async fn totals_count_activities_deliveries_and_open_dead_letters(cx: StoreCx) {
    let s = &*cx.store;
    assert_eq!(s.totals().await.unwrap(), Totals::default());
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    for (key, actor) in [("k1", alice), ("k2", alice), ("k3", bob)] {
        s.insert_activity(activity(key, actor, "Create", None))
            .await
            .unwrap();
    }
    for inbox in ["https://a.example/inbox", "https://b.example/inbox"] {
        s.record_delivered("k1", inbox, "h", 202, 1).await.unwrap();
    }
    for key in ["k2", "k3"] {
        s.add_dead_letter(NewDeadLetter {
            activity_key: key.into(),
            inbox: "https://c.example/inbox".into(),
            host: "c.example".into(),
            reason: "gone".into(),
            last_status: Some(410),
            attempts: 1,
            first_attempt_unix_ms: now_ms(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        s.totals().await.unwrap(),
        Totals {
            activities: 3,
            delivered: 2,
            dead_letters: 2,
        }
    );
    let first = s.dead_letters_to_replay(None, None, 1).await.unwrap();
    s.mark_replayed(&[first[0].id]).await.unwrap();
    assert_eq!(
        s.totals().await.unwrap(),
        Totals {
            activities: 3,
            delivered: 2,
            dead_letters: 1,
        }
    );
}

fn rule(domain: &str, kind: PolicyKind, reason: &str, at: i64) -> DomainPolicy {
    DomainPolicy {
        domain: domain.into(),
        kind,
        reason: reason.into(),
        updated_unix_ms: at,
    }
}

async fn domain_policies_are_set_replaced_removed_and_seeded_once(cx: StoreCx) {
    let s = &*cx.store;
    assert!(s.domain_policies().await.unwrap().is_empty());
    let bad = rule("bad.example", PolicyKind::Suspend, "spam", 1);
    let loud = rule("loud.example", PolicyKind::Silence, "", 2);
    s.set_domain_policy(&bad).await.unwrap();
    s.set_domain_policy(&loud).await.unwrap();
    assert_eq!(
        s.domain_policies().await.unwrap(),
        [bad.clone(), loud.clone()]
    );
    let allowed = rule("bad.example", PolicyKind::Allow, "appealed", 3);
    s.set_domain_policy(&allowed).await.unwrap();
    assert_eq!(s.domain_policies().await.unwrap(), [allowed, loud.clone()]);
    assert!(s.remove_domain_policy("bad.example").await.unwrap());
    assert!(!s.remove_domain_policy("bad.example").await.unwrap());
    assert_eq!(
        s.domain_policies().await.unwrap(),
        std::slice::from_ref(&loud)
    );

    // Seeds: each domain once. One removed by an operator is not put back,
    // and a seed never overrides a rule set by hand.
    let seeds = [
        rule(
            "env.example",
            PolicyKind::Suspend,
            "STAMPEDE_BLOCKED_DOMAINS",
            4,
        ),
        rule(
            "loud.example",
            PolicyKind::Suspend,
            "STAMPEDE_BLOCKED_DOMAINS",
            4,
        ),
    ];
    assert_eq!(s.seed_domain_policies(&seeds).await.unwrap(), 1);
    assert_eq!(s.seed_domain_policies(&seeds).await.unwrap(), 0);
    assert_eq!(s.domain_policies().await.unwrap(), [seeds[0].clone(), loud]);
    assert!(s.remove_domain_policy("env.example").await.unwrap());
    assert_eq!(s.seed_domain_policies(&seeds).await.unwrap(), 0);
    assert_eq!(s.domain_policies().await.unwrap().len(), 1);
}

async fn a_domains_footprint_is_found_and_forgotten(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    let bob = s.create_actor(new_actor("bob")).await.unwrap().id;
    let on = |host: &str, user: &str| follower(host, user, None);
    for (actor, f) in [
        (alice, on("a.bad.example", "x")),
        (bob, on("a.bad.example", "x")),
        (alice, on("bad.example:8443", "y")),
        (alice, on("good.example", "z")),
        (alice, on("notbad_example.org", "w")),
    ] {
        s.add_follower(actor, &f).await.unwrap();
    }
    s.add_follow_request(
        bob,
        &on("c.bad.example", "q"),
        &serde_json::json!({"type": "Follow"}),
    )
    .await
    .unwrap();
    let remote = |id: &str| RemoteActor {
        id: id.into(),
        inbox: format!("{id}/inbox"),
        shared_inbox: None,
        key_id: Some(format!("{id}#main-key")),
        public_key_pem: None,
    };
    s.put_remote_actor(&remote("https://d.bad.example/users/r"))
        .await
        .unwrap();
    s.put_remote_actor(&remote("https://good.example/users/g"))
        .await
        .unwrap();
    for (key_id, owner) in [
        (
            "https://a.bad.example/users/x#main-key",
            "https://a.bad.example/users/x",
        ),
        (
            "https://good.example/users/z#main-key",
            "https://good.example/users/z",
        ),
    ] {
        s.put_remote_key(&RemoteKey {
            key_id: key_id.into(),
            owner: owner.into(),
            public_key_pem: "pem".into(),
        })
        .await
        .unwrap();
    }

    let mut f = s.domain_footprint("bad.example").await.unwrap();
    f.hosts.sort();
    assert_eq!(
        f.hosts,
        [
            "a.bad.example",
            "bad.example:8443",
            "c.bad.example",
            "d.bad.example"
        ],
        "every table's hosts, once each"
    );
    assert_eq!(f.key_ids, ["https://a.bad.example/users/x#main-key"]);
    assert_eq!(
        s.domain_footprint("bad_example").await.unwrap().hosts,
        ["notbad_example.org"],
        "LIKE's `_` is not a wildcard"
    );

    let removed = s.forget_hosts(&f.hosts, &f.key_ids).await.unwrap();
    assert_eq!(removed, 3, "alice's two and bob's one");
    assert_eq!(s.follower_count(alice).await.unwrap(), 2);
    assert_eq!(s.follower_count(bob).await.unwrap(), 0);
    assert!(s
        .take_follow_request(bob, "https://c.bad.example/users/q")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .remote_actor("https://d.bad.example/users/r")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .remote_actor("https://good.example/users/g")
        .await
        .unwrap()
        .is_some());
    assert!(s
        .remote_key("https://a.bad.example/users/x#main-key")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .remote_key("https://good.example/users/z#main-key")
        .await
        .unwrap()
        .is_some());
    assert!(s
        .domain_footprint("bad.example")
        .await
        .unwrap()
        .hosts
        .is_empty());
}

async fn unavailable_hosts_are_listed_and_marked_available(cx: StoreCx) {
    let s = &*cx.store;
    assert!(s.unavailable_hosts(10).await.unwrap().is_empty());
    let now = now_ms();
    let health = |host: &str, since: i64, unavailable: bool| HostHealth {
        host: host.into(),
        failing_since_unix_ms: since,
        failures: 30,
        open_until_unix_ms: now + 60_000,
        unavailable,
    };
    let old = health("old.example", now - 90_000, true);
    let newer = health("newer.example:8443", now - 50_000, true);
    let failing = health("failing.example", now - 100_000, false);
    for h in [&old, &newer, &failing] {
        s.set_host_health(&h.host, Some(h)).await.unwrap();
    }
    assert_eq!(
        s.unavailable_hosts(10).await.unwrap(),
        [old.host.clone(), newer.host.clone()],
        "longest failing first; a failing host not yet unavailable is not listed"
    );
    assert_eq!(
        s.unavailable_hosts(1).await.unwrap(),
        std::slice::from_ref(&old.host)
    );

    assert!(s.mark_host_available(&old.host).await.unwrap());
    assert!(!s.mark_host_available(&old.host).await.unwrap());
    assert!(!s.mark_host_available("never.example").await.unwrap());
    assert_eq!(
        s.unavailable_hosts(10).await.unwrap(),
        std::slice::from_ref(&newer.host)
    );
    // Still failing: only the mark went.
    let listed = s.failing_hosts(10).await.unwrap();
    let o = listed.iter().find(|h| h.host == old.host).unwrap();
    assert_eq!(
        o,
        &HostHealth {
            unavailable: false,
            ..old
        }
    );
    s.set_host_health(&newer.host, None).await.unwrap();
    assert!(s.unavailable_hosts(10).await.unwrap().is_empty());
}

async fn an_activitys_delivery_is_counted_from_its_records(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    let ap_id = "https://local.example/activities/k1";
    let d = s.activity_delivery(ap_id).await.unwrap().unwrap();
    assert_eq!(
        (d.key.as_str(), d.fanned_out, d.hosts.len()),
        ("k1", false, 0)
    );
    assert!(s
        .activity_delivery("https://nope.example/x")
        .await
        .unwrap()
        .is_none());

    let inbox = |h: &str, n: u32| format!("https://{h}/users/u{n}/inbox");
    let skip = |h: &str, n: u32, reason: &'static str| Skip {
        inbox: inbox(h, n),
        host: h.into(),
        reason,
    };
    // A page run twice counts once; the second page adds.
    for _ in 0..2 {
        s.record_fanout_page(
            "k1",
            "",
            &[("a.example".into(), 3), ("b.example".into(), 2)],
            &[skip("bad.example", 1, "blocked")],
        )
        .await
        .unwrap();
    }
    s.record_fanout_page(
        "k1",
        "https://b.example/u9",
        &[("b.example".into(), 1)],
        &[skip("gone.example", 1, "unavailable")],
    )
    .await
    .unwrap();
    s.mark_fanned_out("k1", 6).await.unwrap();
    // a: two delivered (one after a retry), one dead; b: one retrying, one
    // delivered twice (a redelivered copy), one dropped at send time.
    s.record_retry(
        "k1",
        &inbox("a.example", 1),
        "a.example",
        1,
        Some(503),
        now_ms() + 60_000,
    )
    .await
    .unwrap();
    s.record_delivered("k1", &inbox("a.example", 1), "a.example", 202, 2)
        .await
        .unwrap();
    s.record_delivered("k1", &inbox("a.example", 2), "a.example", 202, 1)
        .await
        .unwrap();
    s.record_retry("k1", &inbox("a.example", 3), "a.example", 1, None, now_ms())
        .await
        .unwrap();
    s.add_dead_letter(NewDeadLetter {
        activity_key: "k1".into(),
        inbox: inbox("a.example", 3),
        host: "a.example".into(),
        reason: "410".into(),
        last_status: Some(410),
        attempts: 2,
        first_attempt_unix_ms: now_ms(),
    })
    .await
    .unwrap();
    for attempts in [1, 2] {
        s.record_retry(
            "k1",
            &inbox("b.example", 1),
            "b.example",
            attempts,
            Some(500),
            now_ms(),
        )
        .await
        .unwrap();
    }
    for _ in 0..2 {
        s.record_delivered("k1", &inbox("b.example", 2), "b.example", 200, 1)
            .await
            .unwrap();
    }
    s.record_skip("k1", &skip("b.example", 3, "superseded"))
        .await
        .unwrap();

    let d = s.activity_delivery("k1").await.unwrap().unwrap();
    assert_eq!((d.ap_id.as_str(), d.fanned_out), (ap_id, true));
    let host = |h: &str, targets, delivered, retrying, dead_lettered, skipped: &[(&str, u64)]| {
        HostDelivery {
            host: h.into(),
            targets,
            delivered,
            retrying,
            dead_lettered,
            skipped: skipped.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
        }
    };
    assert_eq!(
        d.hosts,
        [
            host("a.example", 3, 2, 0, 1, &[]),
            host("b.example", 3, 1, 1, 0, &[("superseded", 1)]),
            host("bad.example", 0, 0, 0, 0, &[("blocked", 1)]),
            host("gone.example", 0, 0, 0, 0, &[("unavailable", 1)]),
        ]
    );
    // A dead letter replayed is pending again.
    let ids: Vec<i64> = s
        .dead_letters(10, None)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    s.mark_replayed(&ids).await.unwrap();
    let d = s.activity_delivery(ap_id).await.unwrap().unwrap();
    assert_eq!(d.hosts[0], host("a.example", 3, 2, 0, 0, &[]));

    // Pruned with the success records: the counts, skips and retries.
    assert_eq!(s.prune_status_records(0, 100).await.unwrap(), 0);
    let later = now_ms() + 3_600_000;
    assert_eq!(
        s.prune_status_records(later, 2).await.unwrap(),
        5,
        "2 + 2 + 1"
    );
    assert_eq!(s.prune_status_records(later, 100).await.unwrap(), 2);
    let d = s.activity_delivery(ap_id).await.unwrap().unwrap();
    assert!(d
        .hosts
        .iter()
        .all(|h| h.targets == 0 && h.retrying == 0 && h.skipped.is_empty()));
}

/// Lets the clock (ours, PostgreSQL's: one machine) move past what was
/// just written.
async fn tick() {
    tokio::time::sleep(std::time::Duration::from_millis(15)).await;
}

async fn prune_delivery_records_keeps_records_newer_than_the_cutoff(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    let inbox = |i: u32| format!("https://r{i}.example/inbox");
    for i in 0..5 {
        s.record_delivered("k1", &inbox(i), "r.example", 202, 1)
            .await
            .unwrap();
    }
    tick().await;
    let cutoff = now_ms();
    // Written just after the cutoff: it stays.
    s.record_delivered("k1", &inbox(9), "r.example", 202, 1)
        .await
        .unwrap();
    // In batches of at most the limit, until none is older.
    let mut batches = Vec::new();
    loop {
        let n = s.prune_delivery_records(cutoff, 2).await.unwrap();
        batches.push(n);
        if n < 2 {
            break;
        }
    }
    assert_eq!(batches, [2, 2, 1]);
    assert_eq!(s.prune_delivery_records(cutoff, 2).await.unwrap(), 0);
    for i in 0..5 {
        assert!(!s.delivered("k1", &inbox(i)).await.unwrap(), "{i}");
    }
    assert!(s.delivered("k1", &inbox(9)).await.unwrap());
    assert_eq!(s.totals().await.unwrap().delivered, 1);
    tick().await;
    assert_eq!(s.prune_delivery_records(now_ms(), 1000).await.unwrap(), 1);
    assert!(!s.delivered("k1", &inbox(9)).await.unwrap());
}

async fn prune_dead_letters_by_replay_or_last_attempt(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    let dead = |host: &str| NewDeadLetter {
        activity_key: "k1".to_string(),
        inbox: format!("https://{host}/inbox"),
        host: host.to_string(),
        reason: "HTTP 500".to_string(),
        last_status: Some(500),
        attempts: 3,
        first_attempt_unix_ms: now_ms() - 60_000,
    };
    for h in ["old.example", "replayed.example"] {
        s.add_dead_letter(dead(h)).await.unwrap();
    }
    tick().await;
    let attempted_cutoff = now_ms();
    // Last attempt just after the cutoff: it stays.
    s.add_dead_letter(dead("new.example")).await.unwrap();
    let open = |v: Vec<stampede_backends::store::DeadLetter>| {
        let mut h: Vec<String> = v.into_iter().map(|d| d.host).collect();
        h.sort();
        h
    };
    let replayed = s
        .dead_letters(10, Some("replayed.example"))
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect::<Vec<_>>();
    tick().await;
    let before_replay = now_ms();
    tick().await;
    s.mark_replayed(&replayed).await.unwrap();
    tick().await;
    let after_replay = now_ms();

    // Replayed after the cutoff: kept; before it: gone. Last attempts
    // (all older than both) not looked at.
    assert_eq!(s.prune_dead_letters(before_replay, 0, 10).await.unwrap(), 0);
    assert_eq!(s.prune_dead_letters(after_replay, 0, 10).await.unwrap(), 1);
    assert_eq!(
        open(s.dead_letters(10, None).await.unwrap()),
        ["new.example", "old.example"]
    );
    // By last attempt: the one just newer than the cutoff stays.
    assert_eq!(
        s.prune_dead_letters(0, attempted_cutoff, 10).await.unwrap(),
        1
    );
    assert_eq!(
        open(s.dead_letters(10, None).await.unwrap()),
        ["new.example"]
    );
    // In batches.
    for _ in 0..3 {
        s.add_dead_letter(dead("more.example")).await.unwrap();
    }
    tick().await;
    let now = now_ms();
    assert_eq!(s.prune_dead_letters(0, now, 3).await.unwrap(), 3);
    assert_eq!(s.prune_dead_letters(0, now, 3).await.unwrap(), 1);
    assert_eq!(s.prune_dead_letters(0, now, 3).await.unwrap(), 0);
    assert_eq!(s.totals().await.unwrap().dead_letters, 0);
}

async fn purge_dead_letters_of_a_host_or_all_in_batches(cx: StoreCx) {
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    let dead = |host: &str, n: u32| NewDeadLetter {
        activity_key: "k1".to_string(),
        inbox: format!("https://{host}/users/{n}/inbox"),
        host: host.to_string(),
        reason: "gone".to_string(),
        last_status: Some(410),
        attempts: 1,
        first_attempt_unix_ms: now_ms(),
    };
    for n in 0..3 {
        s.add_dead_letter(dead("a.example", n)).await.unwrap();
    }
    for n in 0..2 {
        s.add_dead_letter(dead("b.example", n)).await.unwrap();
    }
    // A replayed one is purged too.
    let first = s.dead_letters(10, Some("a.example")).await.unwrap();
    s.mark_replayed(&[first[0].id]).await.unwrap();

    assert_eq!(s.purge_dead_letters(Some("a.example"), 2).await.unwrap(), 2);
    assert_eq!(s.purge_dead_letters(Some("a.example"), 2).await.unwrap(), 1);
    assert_eq!(s.purge_dead_letters(Some("a.example"), 2).await.unwrap(), 0);
    assert_eq!(
        s.dead_letters(10, Some("b.example")).await.unwrap().len(),
        2
    );
    assert_eq!(
        s.purge_dead_letters(Some("nobody.example"), 2)
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.purge_dead_letters(None, 10).await.unwrap(), 2);
    assert_eq!(s.totals().await.unwrap().dead_letters, 0);
}

async fn migrations_racing_one_another_build_the_retention_indexes(cx: StoreCx) {
    const INDEXES: &str = "'deliveries_delivered_at', 'dead_letters_last_attempt',
                           'dead_letters_replayed', 'dead_letters_host'";
    let pg = match cx.postgres_url() {
        Some(url) => {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            // As before the upgrade: the index migration (run outside a
            // transaction) not applied, an index of it left behind as an
            // interrupted build leaves it.
            client
                .batch_execute(
                    "DELETE FROM stampede_migrations WHERE version = 7;
                     DROP INDEX deliveries_delivered_at, dead_letters_host;",
                )
                .await
                .unwrap();
            // A process whose pool has one connection (the lock's
            // transaction holds it).
            let single = stampede_backends::store::postgres::PgStore::connect(url, 1).unwrap();
            Some((client, single))
        }
        None => None,
    };
    // Three processes starting at once, one of them the application
    // writing meanwhile: each waits for the one migrating, none for ever.
    let s = &*cx.store;
    let alice = s.create_actor(new_actor("alice")).await.unwrap().id;
    s.insert_activity(activity("k1", alice, "Create", None))
        .await
        .unwrap();
    let writes = async {
        for i in 0..20 {
            s.record_delivered("k1", &format!("https://r{i}.example/inbox"), "r", 202, 1)
                .await
                .unwrap();
        }
    };
    let single = async {
        match &pg {
            Some((_, single)) => single.migrate().await,
            None => Ok(()),
        }
    };
    let all = futures::future::join5(s.migrate(), s.migrate(), single, s.migrate(), writes);
    let (a, b, c, d, ()) = tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("migrations racing one another finish");
    for r in [a, b, c, d] {
        r.unwrap();
    }
    assert_eq!(s.totals().await.unwrap().delivered, 20);
    if let Some((client, _)) = pg {
        let row = client
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                             WHERE c.relname IN ({INDEXES}) AND i.indisvalid),
                            (SELECT count(*) FROM stampede_migrations WHERE version = 7)"
                ),
                &[],
            )
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (4, 1));
    }
}
