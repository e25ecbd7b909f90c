//! One test binary for every story over real processes, so the daemons are
//! built once: fault stories (`faults`), high availability on PostgreSQL
//! (`ha`), hostile input (`hostile`) and hostile pipelines against the
//! task sandbox (`sandbox`), stolen, scoped and revoked credentials and
//! files at rest (`credentials`), a state dir that fills up (`diskfull`),
//! jobs and the refs they were built for (`refs`), reruns (`rerun`),
//! bounded, pruned logs (`logs`), a store restored from a backup
//! (`restore`), why a queued job waits (`waiting`), failed
//! infrastructure that is not a red build (`infra`), and rolling drains
//! (`drain`).
//! Each story has its own scratch directory, ports and daemons, so libtest
//! runs them in parallel.

mod common;
mod credentials;
mod diskfull;
mod drain;
mod faults;
mod fetch;
mod ha;
mod hostile;
mod infra;
mod logs;
mod refs;
mod rerun;
mod restore;
mod sandbox;
mod waiting;
