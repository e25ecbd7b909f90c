//! The surveil-dispatcher daemon (work in progress: see the open issues).
