//! Cluster tests over real sockets and processes live in this crate's `tests/`.
