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

/// Encoded `FileDescriptorSet` for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stampede_descriptor");
