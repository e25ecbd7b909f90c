//! The surveil-runner daemon as a library (work in progress: see issue #4).

pub mod executor;
pub mod joblog;
pub mod pipeline;
pub mod workspace;
