//! Library: end-to-end test support lives in the test targets.
