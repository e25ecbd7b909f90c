//! The surveil-runner daemon (work in progress: see the open issues).
