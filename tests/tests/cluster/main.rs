//! One test binary for every story over real processes, so the daemons are
//! built once: fault stories (`faults`), high availability on PostgreSQL
//! (`ha`), hostile input (`hostile`) and
//! hostile pipelines against the task sandbox (`sandbox`).
//! Each story has its own scratch directory, ports and daemons, so libtest
//! runs them in parallel.

mod common;
mod faults;
mod fetch;
mod ha;
mod hostile;
mod sandbox;
