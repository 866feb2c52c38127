//! Library: end-to-end test support lives in the test targets; what several
//! of them share (the RabbitMQ cluster) lives here.

pub mod cluster;
