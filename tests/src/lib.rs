//! Library: end-to-end test support lives in the test targets; what several
//! of them share (private backend servers, the RabbitMQ cluster) lives here.

pub mod cluster;
pub mod private_backends;
