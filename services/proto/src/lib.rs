//! Library: the generated gRPC services and queue message types of stampede,
//! compiled from `proto/` by `build.rs`.
#![allow(missing_docs, clippy::all)]

/// gRPC API (`stampede.v1`).
pub mod api {
    tonic::include_proto!("stampede.v1");
}

/// Queue messages (`stampede.queue.v1`).
pub mod queue {
    tonic::include_proto!("stampede.queue.v1");
}

/// The type of each queue message as it travels (the AMQP `type`
/// property, a column of the embedded queue): its full protobuf name. A
/// consumer refuses a message of another type (to the dead-letter queue).
pub mod kinds {
    /// `FanoutJob`: ingest → fanout.
    pub const FANOUT_JOB: &str = "stampede.queue.v1.FanoutJob";
    /// `DeliveryJob`: fanout → delivery, and retries.
    pub const DELIVERY_JOB: &str = "stampede.queue.v1.DeliveryJob";
    /// `InboundJob`: ingest → inbox.
    pub const INBOUND_JOB: &str = "stampede.queue.v1.InboundJob";
    /// `VerifiedActivity`: inbox → the application.
    pub const VERIFIED_ACTIVITY: &str = "stampede.queue.v1.VerifiedActivity";
}

pub mod error;
pub use error::ErrorCode;

/// Encoded `FileDescriptorSet` for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stampede_descriptor");
