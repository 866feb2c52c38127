//! Library: the federation logic the services share (docs/ARCHITECTURE.md,
//! "Crates"), built on the runtime:
//!
//! - [`verify`]: an inbound signed request verified end to end (the inbox
//!   service and the `Verify` gRPC call);
//! - [`key_resolver`]: remote public keys, cached and fetched, every fetch
//!   bound to the origin fetched;
//! - [`remote_actors`]: remote actor ids resolved to their inboxes, and
//!   signed GETs;
//! - [`publish`]: an outbound activity validated, stored once and queued for
//!   fanout;
//! - [`dead_letters`]: dead letters replayed;
//! - [`domains`]: domain policies set and removed at runtime;
//! - [`hosts`]: per-host state shared by the delivery workers: pause, the
//!   circuit breaker, the ramp after a recovery;
//! - [`parked`]: deliveries parked in the delay queues, counted per reason;
//! - [`backlog`]: deliveries pending per host and hosts' last answers, for
//!   the hosts view;
//! - [`cache_keys`]: every key kept in the shared cache.

pub mod backlog;
pub mod cache_keys;
pub mod dead_letters;
pub mod domains;
pub mod hosts;
pub mod key_resolver;
pub mod parked;
pub mod publish;
pub mod queue_heads;
pub mod remote_actors;
pub mod verify;
