//! The contract suites: one suite of tests per backend trait, written once
//! and run against both of its implementations, so that the services behave
//! the same on RabbitMQ, PostgreSQL and Redis as on the embedded backends.
//!
//! - [`queue`]: `Queue` on RabbitMQ (`AmqpQueue`) and on a SQLite file
//!   (`EmbeddedQueue`);
//! - [`store`]: `Store` on PostgreSQL (`PgStore`) and on a SQLite file
//!   (`EmbeddedStore`);
//! - [`cache`]: `Cache` on Redis (`RedisCache`) and in memory
//!   (`MemoryCache`).
//!
//! Each suite is a list of `async fn`s taking the implementation under test,
//! and a macro that instantiates every one of them as a `#[tokio::test]` for
//! one implementation, given its factory (in [`support`]). Each test runs on
//! state of its own (a queue namespace, a Redis key prefix, a database, a
//! data directory) that is removed afterwards, whether it passed or failed.
//!
//! The external backends are read from `STAMPEDE_TEST_AMQP_URL`,
//! `STAMPEDE_TEST_REDIS_URL` and `STAMPEDE_TEST_DATABASE_URL` (an admin
//! database the tests create and drop their own databases from), with the
//! local defaults `scripts/test` uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache;
mod queue;
mod store;
mod support;
