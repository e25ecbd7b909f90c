//! Shared daemon plumbing (being written).
