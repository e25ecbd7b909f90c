//! The surveil-dispatcher daemon (work in progress: see the open issues).

pub mod scheduler;
