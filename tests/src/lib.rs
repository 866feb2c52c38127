//! Library: end-to-end test support lives in the test targets; what is
//! shared with other tools (private backend servers) lives here.
pub mod private_backends;
