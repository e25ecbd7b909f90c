//! Shared harness for cluster tests and for `cargo xtask` (e2e, chaos,
//! bench): real daemon processes on 127.0.0.1, the `surveil` CLI as the
//! query tool, scratch git repositories. The stories themselves live in this
//! crate's `tests/` directory and in `xtask`.

pub mod cluster;
pub mod githttp;
pub mod postgres;
pub mod probe;
pub mod record;
pub mod relay;
