//! The surveil-observer daemon (work in progress: see the open issues).
