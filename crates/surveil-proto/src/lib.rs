//! The Surveil wire protocol: the messages, the frame codec and the handshake.
//!
//! This crate is everything a program needs to talk to a Surveil dispatcher:
//! a runner written by you, an observer, or a tool that queries jobs. It
//! carries no logging setup, no CLI parsing and no error-reporting framework,
//! so depending on it brings in only tokio, prost and their basics.
//!
//! # Frame layout
//!
//! A connection is a stream of frames. Each frame is a 4-byte big-endian
//! unsigned length `N`, then `N` bytes of one protobuf [`Envelope`]:
//!
//! ```text
//! +----------------+--------------------------------------+
//! | N: u32, BE     | N bytes: surveil.v1.Envelope          |
//! +----------------+--------------------------------------+
//! ```
//!
//! `N` above the receiver's limit ([`DEFAULT_MAX_FRAME`] unless configured)
//! is a protocol error that ends the connection; [`Codec`] reports it as
//! [`CodecError::FrameTooLarge`] without ever allocating `N` bytes.
//!
//! # Layers
//!
//! - [`v1`]: the generated message types (re-exported at the crate root);
//!   `proto/surveil/v1/surveil.proto` is their source.
//! - [`Codec`]: a tokio-util [`Decoder`](tokio_util::codec::Decoder) and
//!   [`Encoder`](tokio_util::codec::Encoder) of [`Envelope`]s.
//! - [`Connection`]: a typed connection over any `AsyncRead + AsyncWrite`,
//!   with the client and server sides of the handshake.
//!
//! # Example
//!
//! A complete handshake and one ping over an in-memory pipe; a real runner
//! uses a `TcpStream` in the same way.
//!
//! ```
//! use std::time::Duration;
//! use surveil_proto::{Connection, Hello, Msg, Ping, Pong, Role, Welcome};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (client_io, server_io) = tokio::io::duplex(64 * 1024);
//! let timeout = Duration::from_secs(5);
//!
//! let server = tokio::spawn(async move {
//!     let mut conn = Connection::new(server_io);
//!     let hello = conn.accept_hello(timeout).await?;
//!     assert_eq!(hello.name, "ci-1");
//!     conn.send(Welcome {
//!         session_id: "s-1".into(),
//!         heartbeat_interval_ms: 1000,
//!         runner_timeout_ms: 5000,
//!         server_version: "example".into(),
//!         epoch: "0123456789abcdef0123456789abcdef".into(),
//!     })
//!     .await?;
//!     conn.send(Ping { seq: 7 }).await?;
//!     let reply = conn.recv().await?;
//!     assert_eq!(reply, Some(Msg::Pong(Pong { seq: 7 })));
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! });
//!
//! let mut conn = Connection::new(client_io);
//! let mut hello = Hello::new(Role::Runner, "ci-1");
//! hello.slots = 1;
//! hello.repos = vec!["/srv/git/app".into()];
//! let welcome = conn.client_handshake(hello, timeout).await?;
//! assert_eq!(welcome.runner_timeout_ms, 5000);
//! if let Some(Msg::Ping(ping)) = conn.recv().await? {
//!     conn.send(Pong { seq: ping.seq }).await?;
//! }
//! server.await?.map_err(|e| e.to_string())?;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod codec;
mod connection;
mod messages;

/// The generated protobuf types of package `surveil.v1`.
///
/// Every type is also re-exported at the crate root.
#[allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod v1 {
    include!("generated/surveil.v1.rs");
}

pub use codec::{Codec, CodecError, DEFAULT_MAX_FRAME, LENGTH_PREFIX_LEN, MAX_LOG_CHUNK};
pub use connection::{Connection, ConnectionError, FrameReader, FrameWriter, HandshakeError};
pub use v1::envelope::Msg;
pub use v1::*;

/// The protocol version this crate speaks, sent in [`Hello::protocol_version`].
pub const PROTOCOL_VERSION: u32 = 1;
