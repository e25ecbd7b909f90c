//! One test binary for every story over real processes, so the daemons are
//! built once: fault stories (`faults`), hostile input (`hostile`) and
//! hostile pipelines against the task sandbox (`sandbox`), jobs and their
//! refs (`refs`).
//! Each story has its own scratch directory, ports and daemons, so libtest
//! runs them in parallel.

mod common;
mod faults;
mod fetch;
mod hostile;
mod refs;
mod sandbox;
