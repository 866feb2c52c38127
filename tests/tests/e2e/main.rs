//! End-to-end tests: ingest, fanout, delivery and inbox started as in
//! production (each with its own backend connections, listeners and
//! shutdown) against the real RabbitMQ, Redis and PostgreSQL, delivering to
//! fake remote servers on 127.0.0.1 that verify what they receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod delivery;
mod helpers;
mod inbound;
mod outbound;
mod process;
