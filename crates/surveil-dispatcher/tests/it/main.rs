//! In-process dispatcher tests over real sockets on 127.0.0.1:0, one
//! module per story. Runners and clients are fakes driven by the test.

mod harness;

mod assignment;
mod ha;
mod handshake;
mod http;
mod liveness;
mod queries;
mod restart;
mod spawner;
mod store_faults;
