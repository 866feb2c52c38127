//! End-to-end tests: ingest, fanout, delivery and inbox started as in
//! production, on both backend sets (separate services on the real RabbitMQ,
//! Redis and PostgreSQL; all in one on the embedded backends), delivering to
//! fake remote servers on 127.0.0.1 that verify what they receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod activity_status;
mod bench;
mod cli;
mod cluster;
mod console;
mod crash;
mod delivery;
mod disk_full;
mod domains;
mod embedded;
mod faults;
mod fetch;
mod helpers;
mod hosts;
mod inbound;
mod local_actors;
mod metrics;
mod outbound;
mod pgbouncer;
mod priority;
mod process;
mod replicas;
mod replicated;
mod retention;
mod signatures;
mod trust;
mod upgrade;
mod webdriver;
