//! Library: the protocol core of stampede. ActivityStreams activities and
//! their addressing, shared-inbox grouping, HTTP Signatures and body digests,
//! as pure functions over plain data: no runtime, no queue, no database, so it
//! is tested in microseconds and could be published on its own.
#![deny(missing_docs)]

pub mod activity;
pub mod digest;
pub mod documents;
mod error;
pub mod followers_sync;
#[doc(hidden)]
pub mod fuzzing;
pub mod integrity;
pub mod jcs;
pub mod keys;
pub mod multibase;
pub mod rfc9421;
pub mod sfv;
pub mod signature;
pub mod targets;
pub mod verify;
pub mod webfinger;

pub use error::CoreError;
