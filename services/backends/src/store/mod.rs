//! The durable store the services are written against: local actors and
//! their keys, followers, the remote-actor cache, outbound activities,
//! delivery records and dead letters. Two implementations keep this
//! contract, checked by one test suite (`tests/contract/`): PostgreSQL
//! ([`postgres`]) and a SQLite file of the embedded layout ([`embedded`]).
use async_trait::async_trait;

use crate::Result;

pub mod embedded;
pub mod postgres;

/// Private key bytes (PKCS#8 DER) that never show in `Debug` output.
#[derive(Clone)]
pub struct PrivateKey(pub Vec<u8>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<private key>")
    }
}

/// A local actor.
#[derive(Debug, Clone)]
pub struct LocalActor {
    /// Store id.
    pub id: i64,
    /// Preferred username.
    pub name: String,
    /// Display name.
    pub display_name: String,
    /// Bio.
    pub summary: String,
    /// Follow requests need the application's decision.
    pub manually_approves_followers: bool,
    /// RSA-2048 private key, PKCS#8 DER.
    pub private_key: PrivateKey,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

/// A local actor without its keys or profile: what the inbound paths (the
/// inbox edge, the inbox's Follow and Undo) and publishing need. Read by
/// [`Store::actor_ref_by_name`], which never loads a private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorRef {
    /// Store id.
    pub id: i64,
    /// Preferred username.
    pub name: String,
    /// Follow requests need the application's decision.
    pub manually_approves_followers: bool,
}

/// A local actor as the world sees it: everything but its private key.
/// Read by [`Store::actor_profile_by_name`] for the actor documents remote
/// servers fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorProfile {
    /// Store id.
    pub id: i64,
    /// Preferred username.
    pub name: String,
    /// Display name.
    pub display_name: String,
    /// Bio.
    pub summary: String,
    /// Follow requests need the application's decision.
    pub manually_approves_followers: bool,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

impl LocalActor {
    /// The actor without its private key.
    pub fn profile(&self) -> ActorProfile {
        ActorProfile {
            id: self.id,
            name: self.name.clone(),
            display_name: self.display_name.clone(),
            summary: self.summary.clone(),
            manually_approves_followers: self.manually_approves_followers,
            public_key_pem: self.public_key_pem.clone(),
        }
    }

    /// The actor without its keys.
    pub fn to_ref(&self) -> ActorRef {
        ActorRef {
            id: self.id,
            name: self.name.clone(),
            manually_approves_followers: self.manually_approves_followers,
        }
    }
}

/// What creating an actor needs.
#[derive(Debug, Clone)]
pub struct NewActor {
    /// Preferred username.
    pub name: String,
    /// Display name.
    pub display_name: String,
    /// Bio.
    pub summary: String,
    /// Follow requests need the application's decision.
    pub manually_approves_followers: bool,
    /// RSA-2048 private key, PKCS#8 DER.
    pub private_key: PrivateKey,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

/// A remote actor following a local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follower {
    /// The remote actor's id.
    pub actor: String,
    /// Its personal inbox.
    pub inbox: String,
    /// Its server's shared inbox, if any.
    pub shared_inbox: Option<String>,
    /// The inbox host (for per-host accounting and removal).
    pub host: String,
    /// Id of the Follow activity, when known.
    pub follow_id: Option<String>,
}

/// A remote public key and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKey {
    /// The key id (`{actor}#main-key`).
    pub key_id: String,
    /// The actor that owns it.
    pub owner: String,
    /// PEM.
    pub public_key_pem: String,
}

/// A remote actor as cached: what fanout needs to address it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteActor {
    /// The actor id.
    pub id: String,
    /// Personal inbox.
    pub inbox: String,
    /// Shared inbox, if any.
    pub shared_inbox: Option<String>,
    /// `publicKey.id`, if any.
    pub key_id: Option<String>,
    /// `publicKey.publicKeyPem`, if any.
    pub public_key_pem: Option<String>,
}

/// An activity to store before it is queued.
#[derive(Debug, Clone)]
pub struct NewActivity {
    /// Store key (a UUID), referenced by queue messages.
    pub key: String,
    /// ActivityPub id.
    pub ap_id: String,
    /// Author.
    pub actor_id: i64,
    /// Activity type.
    pub kind: String,
    /// Object id, when there is one.
    pub object_id: Option<String>,
    /// Client idempotency key, when given.
    pub idempotency_key: Option<String>,
    /// The activity as stored (with bto/bcc).
    pub body: serde_json::Value,
    /// The exact bytes to POST (without bto/bcc).
    pub delivered_body: Vec<u8>,
}

/// The result of [`Store::insert_activity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// Store key of the activity (the existing one when not created).
    pub key: String,
    /// ActivityPub id.
    pub ap_id: String,
    /// False when the idempotency key had been used before.
    pub created: bool,
    /// Whether it is already on the fanout queue.
    pub enqueued: bool,
}

/// A stored activity, as fanout and delivery read it.
#[derive(Debug, Clone)]
pub struct StoredActivity {
    /// Store key.
    pub key: String,
    /// ActivityPub id.
    pub ap_id: String,
    /// Activity type.
    pub kind: String,
    /// Author's store id.
    pub actor_id: i64,
    /// Author's name.
    pub actor_name: String,
    /// The activity as stored (with bto/bcc).
    pub body: serde_json::Value,
    /// The exact bytes to POST.
    pub delivered_body: Vec<u8>,
}

/// A delivery that will not be retried.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// Store key of the activity.
    pub activity_key: String,
    /// Target inbox.
    pub inbox: String,
    /// Inbox host.
    pub host: String,
    /// Why it stopped.
    pub reason: String,
    /// Last HTTP status, if a response came.
    pub last_status: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// First attempt, unix milliseconds.
    pub first_attempt_unix_ms: i64,
}

/// A dead letter as listed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Store id.
    pub id: i64,
    /// The activity's ActivityPub id.
    pub activity_id: String,
    /// Store key of the activity.
    pub activity_key: String,
    /// Target inbox.
    pub inbox: String,
    /// Inbox host.
    pub host: String,
    /// Why it stopped.
    pub reason: String,
    /// Last HTTP status, if any.
    pub last_status: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// First attempt, unix milliseconds.
    pub first_attempt_unix_ms: i64,
    /// Last attempt, unix milliseconds.
    pub last_attempt_unix_ms: i64,
}

/// Totals for `stampede status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Activities stored.
    pub activities: u64,
    /// Deliveries that got a 2xx.
    pub delivered: u64,
    /// Dead letters not replayed.
    pub dead_letters: u64,
}

/// A remote host whose deliveries fail, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHealth {
    /// The host (`name[:port]`).
    pub host: String,
    /// First failure of the current run, unix milliseconds.
    pub failing_since_unix_ms: i64,
    /// Consecutive failures when last recorded.
    pub failures: u64,
    /// Until when its circuit is open (deliveries parked), unix milliseconds; 0 when closed.
    pub open_until_unix_ms: i64,
    /// Failing for longer than `STAMPEDE_HOST_UNAVAILABLE_SECS`: deliveries are dead-lettered.
    pub unavailable: bool,
}

/// What an operator decided about a remote domain (`stampede domain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Federates (needed for allow-list mode).
    Allow,
    /// Federates, but its activities reach the application marked
    /// `silenced`, for it to keep them off public timelines.
    Silence,
    /// Nothing in or out: refused at the edge, not delivered to.
    Suspend,
}

impl PolicyKind {
    /// The name stored and shown: `allow`, `silence`, `suspend`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Allow => "allow",
            PolicyKind::Silence => "silence",
            PolicyKind::Suspend => "suspend",
        }
    }

    /// The kind named `s` (as [`PolicyKind::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(PolicyKind::Allow),
            "silence" => Some(PolicyKind::Silence),
            "suspend" => Some(PolicyKind::Suspend),
            _ => None,
        }
    }
}

/// One domain's policy, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPolicy {
    /// The domain (normalised: lower case, ASCII, no trailing dot, no port);
    /// the rule covers its subdomains too.
    pub domain: String,
    /// What is done with it.
    pub kind: PolicyKind,
    /// Why, for the operators.
    pub reason: String,
    /// Last change, unix milliseconds.
    pub updated_unix_ms: i64,
}

/// What the store knows on hosts whose name contains a domain: candidates
/// for [`Store::forget_hosts`], which the caller filters by the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFootprint {
    /// Hosts (`name[:port]`) of followers, follow requests and cached
    /// remote actors.
    pub hosts: Vec<String>,
    /// Stored remote key ids (at most [`FOOTPRINT_KEYS`]).
    pub key_ids: Vec<String>,
}

/// The most key ids one [`Store::domain_footprint`] returns.
pub const FOOTPRINT_KEYS: u32 = 100_000;

/// `%text%` for LIKE, with LIKE's wildcards in `text` escaped (`\`).
pub(crate) fn like_containing(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// A target an activity's delivery skipped, and why: by fanout (`blocked`,
/// `unavailable`, `own_host`) or at send time (`suspended`, `superseded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// The target inbox.
    pub inbox: String,
    /// Its host.
    pub host: String,
    /// Why.
    pub reason: &'static str,
}

/// One host's share of an activity's delivery, from the durable records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDelivery {
    /// The inbox host.
    pub host: String,
    /// Delivery jobs fanout queued.
    pub targets: u64,
    /// Delivered (2xx).
    pub delivered: u64,
    /// Failed at least once, waiting for a retry.
    pub retrying: u64,
    /// Stopped for good, not replayed.
    pub dead_lettered: u64,
    /// Not sent, by reason ([`Skip::reason`]).
    pub skipped: Vec<(String, u64)>,
}

/// An activity's delivery, host by host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityDelivery {
    /// Store key.
    pub key: String,
    /// ActivityPub id.
    pub ap_id: String,
    /// Whether fanout has queued every job.
    pub fanned_out: bool,
    /// Per host, by host.
    pub hosts: Vec<HostDelivery>,
}

/// Per-host counts gathered from several queries.
#[derive(Default)]
pub(crate) struct HostCounts(std::collections::BTreeMap<String, HostDelivery>);

impl HostCounts {
    /// The entry of `host`, made when new.
    pub(crate) fn get(&mut self, host: String) -> &mut HostDelivery {
        self.0.entry(host.clone()).or_insert_with(|| HostDelivery {
            host,
            ..HostDelivery::default()
        })
    }

    /// By host.
    pub(crate) fn done(self) -> Vec<HostDelivery> {
        self.0.into_values().collect()
    }
}

/// The durable store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending schema migrations.
    async fn migrate(&self) -> Result<()>;
    /// Whether the store answers.
    async fn ping(&self) -> Result<()>;

    /// Creates a local actor; [`crate::Error::Conflict`] ("actor `name` exists
    /// already") when the name is taken.
    async fn create_actor(&self, actor: NewActor) -> Result<LocalActor>;
    /// The actor named `actor.name`, created from `actor` when absent (the
    /// instance actor: several processes may race to create it).
    async fn ensure_actor(&self, actor: NewActor) -> Result<LocalActor>;
    /// Number of local actors.
    async fn actor_count(&self) -> Result<u64>;
    /// A local actor by name.
    async fn actor_by_name(&self, name: &str) -> Result<Option<LocalActor>>;
    /// A local actor by store id.
    async fn actor_by_id(&self, id: i64) -> Result<Option<LocalActor>>;
    /// A local actor by name, without its keys (id, name, whether it
    /// approves followers): the read of every inbound path.
    async fn actor_ref_by_name(&self, name: &str) -> Result<Option<ActorRef>>;
    /// A local actor by name, without its private key: what its documents
    /// show.
    async fn actor_profile_by_name(&self, name: &str) -> Result<Option<ActorProfile>>;
    /// Deletes the local actor `name` with everything that is its own
    /// (followers, follow requests, activities and their delivery records);
    /// true when it was there.
    async fn delete_actor(&self, name: &str) -> Result<bool>;

    /// Adds (or refreshes) a follower of a local actor.
    async fn add_follower(&self, actor_id: i64, follower: &Follower) -> Result<()>;
    /// Adds many followers at once (imports, benchmarks); existing ones are kept.
    async fn add_followers(&self, actor_id: i64, followers: &[Follower]) -> Result<()>;
    /// Removes one follower; true when it was there.
    async fn remove_follower(&self, actor_id: i64, follower: &str) -> Result<bool>;
    /// Removes the follows of `follower` made by the Follow `follow_id`.
    async fn remove_follow_by_id(&self, follower: &str, follow_id: &str) -> Result<u64>;
    /// Removes the follows delivered to `inbox` (personal or shared): it answered 410 Gone.
    async fn remove_followers_by_inbox(&self, inbox: &str) -> Result<u64>;
    /// Removes every follow by `follower` (its actor was deleted).
    async fn remove_follower_everywhere(&self, follower: &str) -> Result<u64>;
    /// Updates the inboxes of every follow by `follower`.
    async fn update_follower_inboxes(
        &self,
        follower: &str,
        inbox: &str,
        shared_inbox: Option<&str>,
        host: &str,
    ) -> Result<u64>;
    /// Stores a Follow waiting for the application's decision.
    async fn add_follow_request(
        &self,
        actor_id: i64,
        follower: &Follower,
        follow: &serde_json::Value,
    ) -> Result<()>;
    /// Removes and returns a pending Follow.
    async fn take_follow_request(
        &self,
        actor_id: i64,
        follower: &str,
    ) -> Result<Option<(Follower, serde_json::Value)>>;
    /// Number of followers of a local actor.
    async fn follower_count(&self, actor_id: i64) -> Result<u64>;
    /// One page of the distinct delivery targets (shared inbox, else inbox)
    /// of a local actor's followers, in order, strictly after `after`.
    /// Keyset paging: the set is never loaded whole.
    async fn follower_targets(
        &self,
        actor_id: i64,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>>;

    /// One page of a local actor's follower ids that start with `prefix`
    /// (`""`: every one), in the store's order, strictly after `after`, at
    /// most `limit`: keyset paging over the followers' primary key, for the
    /// followers collection and FEP-8fcf's partial collections (`prefix` a
    /// `scheme://authority/`).
    async fn follower_ids(
        &self,
        actor_id: i64,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>>;
    /// FEP-8fcf: the digest of the partial followers collection of
    /// `actor_id` for each of `authorities` (each a `scheme://authority`,
    /// see `stampede_core::followers_sync::authority_of`), in order; zero
    /// for an authority with no followers. The first call for an actor
    /// reads its followers once and stores a digest per authority (while
    /// the actor's follows wait for it); from then on every follow inserted
    /// or deleted, by any statement, updates them in its own transaction,
    /// and a call is one indexed read. For actors with few followers
    /// (`STAMPEDE_FOLLOWERS_SYNC_MAX`): the first call reads them all.
    async fn follower_digests(
        &self,
        actor_id: i64,
        authorities: &[String],
    ) -> Result<Vec<stampede_core::followers_sync::Digest>>;

    /// A cached remote actor.
    async fn remote_actor(&self, id: &str) -> Result<Option<RemoteActor>>;
    /// Stores or refreshes a remote actor.
    async fn put_remote_actor(&self, actor: &RemoteActor) -> Result<()>;
    /// Forgets a remote actor (it was deleted).
    async fn delete_remote_actor(&self, id: &str) -> Result<()>;
    /// A stored remote key.
    async fn remote_key(&self, key_id: &str) -> Result<Option<RemoteKey>>;
    /// Stores or replaces a remote key.
    async fn put_remote_key(&self, key: &RemoteKey) -> Result<()>;
    /// Forgets every key of `owner`.
    async fn delete_remote_keys_of(&self, owner: &str) -> Result<()>;

    /// Stores an activity, or returns the one stored under the same
    /// idempotency key.
    async fn insert_activity(&self, activity: NewActivity) -> Result<Inserted>;
    /// Records that the activity is on the fanout queue.
    async fn mark_enqueued(&self, key: &str) -> Result<()>;
    /// Records that fanout queued all its delivery jobs.
    async fn mark_fanned_out(&self, key: &str, targets: u64) -> Result<()>;
    /// Number of activities published by a local actor.
    async fn activity_count(&self, actor_id: i64) -> Result<u64>;
    /// A stored activity with its author's name.
    async fn activity(&self, key: &str) -> Result<Option<StoredActivity>>;

    /// Whether a delivery of this activity to this inbox already succeeded.
    async fn delivered(&self, activity_key: &str, inbox: &str) -> Result<bool>;
    /// Records a successful delivery (before the queue message is acknowledged).
    async fn record_delivered(
        &self,
        activity_key: &str,
        inbox: &str,
        host: &str,
        status: u16,
        attempts: u32,
    ) -> Result<()>;
    /// Records a delivery that stopped for good.
    async fn add_dead_letter(&self, dead: NewDeadLetter) -> Result<()>;
    /// Dead letters not replayed that match (`id`, or `host`, or every one when
    /// both are `None`), oldest first, at most `limit`.
    async fn dead_letters_to_replay(
        &self,
        id: Option<i64>,
        host: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>>;
    /// Marks dead letters replayed.
    async fn mark_replayed(&self, ids: &[i64]) -> Result<()>;
    /// Dead letters not replayed, newest first.
    async fn dead_letters(&self, limit: u32, host: Option<&str>) -> Result<Vec<DeadLetter>>;
    /// Pauses or resumes deliveries to `host`.
    async fn set_host_paused(&self, host: &str, paused: bool) -> Result<()>;
    /// Paused hosts.
    async fn paused_hosts(&self) -> Result<Vec<String>>;
    /// Records a host's failing state, or (`None`) that it recovered.
    async fn set_host_health(&self, host: &str, health: Option<&HostHealth>) -> Result<()>;
    /// Failing hosts, longest failing first, at most `limit`.
    async fn failing_hosts(&self, limit: u32) -> Result<Vec<HostHealth>>;
    /// Whether `actor_id` published a `Delete` of `object_id`.
    async fn object_deleted(&self, actor_id: i64, object_id: &str) -> Result<bool>;
    /// Totals for status.
    async fn totals(&self) -> Result<Totals>;
    /// Deletes up to `limit` rows of each table behind an activity's
    /// delivery status (fanout's counts and skips recorded before
    /// `before_unix_ms`, retries due before it); returns how many. Pruned
    /// with the success records, which the status counts too.
    async fn prune_status_records(&self, before_unix_ms: i64, limit: u32) -> Result<u64>;

    /// Every domain policy, by domain.
    async fn domain_policies(&self) -> Result<Vec<DomainPolicy>>;
    /// Sets (or replaces) a domain's policy.
    async fn set_domain_policy(&self, policy: &DomainPolicy) -> Result<()>;
    /// Removes a domain's policy; true when there was one.
    async fn remove_domain_policy(&self, domain: &str) -> Result<bool>;
    /// Adds the policies of domains never seeded before
    /// (`STAMPEDE_BLOCKED_DOMAINS` seeds the table once: a rule an operator
    /// removed stays removed). Returns how many were added.
    async fn seed_domain_policies(&self, seeds: &[DomainPolicy]) -> Result<u64>;
    /// Hosts marked unavailable (failing for `STAMPEDE_HOST_UNAVAILABLE_SECS`),
    /// longest failing first, at most `limit`.
    async fn unavailable_hosts(&self, limit: u32) -> Result<Vec<String>>;
    /// Clears a host's unavailable mark (it proved it is up), keeping the
    /// rest of its failing state; true when it was marked.
    async fn mark_host_available(&self, host: &str) -> Result<bool>;
    /// Records what one page of an activity's fanout queued per host, and
    /// what it skipped; a page run again replaces its own counts.
    async fn record_fanout_page(
        &self,
        activity_key: &str,
        page: &str,
        per_host: &[(String, u64)],
        skips: &[Skip],
    ) -> Result<()>;
    /// Records a target dropped at send time (`suspended`, `superseded`).
    async fn record_skip(&self, activity_key: &str, skip: &Skip) -> Result<()>;
    /// Records a delivery waiting for its retry (until it succeeds or stops).
    async fn record_retry(
        &self,
        activity_key: &str,
        inbox: &str,
        host: &str,
        attempts: u32,
        last_status: Option<u16>,
        next_unix_ms: i64,
    ) -> Result<()>;
    /// The delivery of the activity with this ActivityPub id or store key.
    async fn activity_delivery(&self, id: &str) -> Result<Option<ActivityDelivery>>;
    /// Hosts and key ids whose text contains `domain`.
    async fn domain_footprint(&self, domain: &str) -> Result<DomainFootprint>;
    /// Forgets `hosts` (a suspended domain's): the follows of local actors
    /// by actors there, their pending follow requests, the cached remote
    /// actors there; and the keys `key_ids`. Returns the follows removed.
    async fn forget_hosts(&self, hosts: &[String], key_ids: &[String]) -> Result<u64>;
    /// Deletes at most `limit` success records written before
    /// `before_unix_ms` (a record of that very millisecond stays), in one
    /// short transaction; returns how many. Called until it returns less
    /// than `limit`. Only the retention pruner calls it, with a cutoff that
    /// keeps every record a queued job may still need
    /// (`stampede_runtime::Config::job_expiry`).
    async fn prune_delivery_records(&self, before_unix_ms: i64, limit: u32) -> Result<u64>;
    /// Deletes at most `limit` dead letters replayed before
    /// `replayed_before_unix_ms`, or whose last attempt was before
    /// `attempted_before_unix_ms`, in one short transaction; returns how
    /// many.
    async fn prune_dead_letters(
        &self,
        replayed_before_unix_ms: i64,
        attempted_before_unix_ms: i64,
        limit: u32,
    ) -> Result<u64>;
    /// Deletes at most `limit` dead letters, replayed or not, of `host`
    /// (every host when `None`), in one short transaction; returns how
    /// many. An operator's purge calls it until it returns 0.
    async fn purge_dead_letters(&self, host: Option<&str>, limit: u32) -> Result<u64>;
}
