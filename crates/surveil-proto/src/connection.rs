//! A typed connection: sends and receives [`Msg`]s over any byte stream and
//! performs both sides of the handshake. It knows nothing about what a role
//! does after the handshake; the daemons decide that.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{Framed, FramedParts, FramedWrite};

use crate::PROTOCOL_VERSION;
use crate::codec::{Codec, CodecError};
use crate::v1::envelope::Msg;
use crate::v1::{Envelope, Hello, Reject, RejectCode, Role, Welcome};

/// Read buffer of a freshly split connection; it grows for larger frames.
const INITIAL_READ_CAPACITY: usize = 512;
/// A flushed write buffer larger than this is released.
const RETAINED_WRITE_CAPACITY: usize = 64 * 1024;

/// How long a best-effort `Reject` may take to write before the connection
/// is dropped anyway: a peer that does not read must not hold us up.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What can go wrong receiving a message.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The frame decoded, but carries no message this protocol version
    /// knows: an empty `Envelope`, or an arm added by a newer version.
    #[error(
        "frame carries no message known to protocol version {PROTOCOL_VERSION} (empty envelope, or a message from a newer version)"
    )]
    UnknownMessage,
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The dispatcher refused the `Hello`.
    #[error("dispatcher rejected the connection ({}): {message}", code.as_str_name())]
    Rejected {
        /// Its reason code.
        code: RejectCode,
        /// Its explanation.
        message: String,
        /// With [`RejectCode::NotLeader`], where the leader is (`host:port`,
        /// empty while none is known): the address to dial instead.
        leader_addr: String,
    },
    /// No complete answer arrived in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection before the handshake completed.
    #[error("connection closed during the handshake")]
    Closed,
    /// The peer sent a different message than the handshake allows.
    #[error("expected {expected} as the first message, got {got}")]
    Unexpected {
        /// What the handshake needed.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The client speaks another protocol version.
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version in the `Hello`.
        got: u32,
    },
    /// The client's `Hello` names no known role.
    #[error("Hello has no valid role (got {0}); expected runner, observer or client")]
    BadRole(i32),
    /// The stream failed or carried garbage.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl HandshakeError {
    /// The [`RejectCode`] a server sends for this failure.
    ///
    /// ```
    /// use std::time::Duration;
    /// use surveil_proto::{HandshakeError, RejectCode};
    /// let err = HandshakeError::Timeout(Duration::from_secs(5));
    /// assert_eq!(err.reject_code(), RejectCode::HandshakeTimeout);
    /// ```
    pub fn reject_code(&self) -> RejectCode {
        match self {
            HandshakeError::Rejected { code, .. } => *code,
            HandshakeError::Timeout(_) => RejectCode::HandshakeTimeout,
            HandshakeError::UnsupportedVersion { .. } => RejectCode::UnsupportedVersion,
            HandshakeError::BadRole(_) => RejectCode::BadRole,
            HandshakeError::Connection(ConnectionError::Codec(err)) => err.reject_code(),
            HandshakeError::Closed
            | HandshakeError::Unexpected { .. }
            | HandshakeError::Connection(ConnectionError::UnknownMessage) => {
                RejectCode::ProtocolError
            }
        }
    }
}

/// A framed, typed connection to a Surveil peer.
///
/// `S` is any byte stream: a `TcpStream`, a TLS stream, or an in-memory
/// `tokio::io::duplex` in tests. See the [crate example](crate) for a
/// complete handshake.
#[derive(Debug)]
pub struct Connection<S> {
    framed: Framed<S, Codec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps `io` with the default frame limit.
    pub fn new(io: S) -> Self {
        Self::with_codec(io, Codec::new())
    }

    /// Wraps `io` with the given codec (for a non-default frame limit).
    pub fn with_codec(io: S, codec: Codec) -> Self {
        Connection {
            framed: Framed::new(io, codec),
        }
    }

    /// Sends one message and flushes it.
    pub async fn send(&mut self, msg: impl Into<Envelope>) -> Result<(), CodecError> {
        self.framed.send(msg.into()).await
    }

    /// Changes the frame limit for what is read and written from now on
    /// (see [`Codec::set_max_frame`]); the limit carries over into
    /// [`split`](Connection::split).
    ///
    /// ```
    /// # use surveil_proto::{Codec, Connection};
    /// let (io, _peer) = tokio::io::duplex(1024);
    /// let mut conn = Connection::with_codec(io, Codec::with_max_frame(64 * 1024));
    /// conn.set_max_frame(8 * 1024 * 1024);
    /// ```
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.framed.codec_mut().set_max_frame(max_frame);
    }

    /// Receives the next message; `Ok(None)` when the peer closed the
    /// connection cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<Msg>, ConnectionError> {
        next_msg(self.framed.next().await)
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }

    /// The underlying stream, mutably: for raw writes (tests of hostile
    /// input). Anything written must leave the stream at a frame boundary.
    pub fn get_mut(&mut self) -> &mut S {
        self.framed.get_mut()
    }

    /// Splits the connection into a reader and a writer that can be used
    /// from different tasks. Bytes already buffered are not lost: call this
    /// right after the handshake, before anything else is read.
    pub fn split(self) -> (FrameReader<S>, FrameWriter<S>) {
        let parts = self.framed.into_parts();
        let max = parts.codec.max_frame();
        let (read, write) = tokio::io::split(parts.io);
        // `Framed::from_parts` (unlike a `FramedRead` whose buffer is filled
        // afterwards) decodes frames already in the buffer before reading
        // again; and the reader keeps the codec itself, which may be part
        // way through a frame whose prefix it has consumed.
        let leftover = !parts.read_buf.is_empty();
        let mut reader = FramedParts::new::<Envelope>(read, parts.codec);
        reader.read_buf = parts.read_buf;
        let mut reader = Framed::from_parts(reader);
        // Buffers start small: a dispatcher holds thousands of idle runner
        // connections whose frames are a few bytes, and tokio-util's 8 KiB
        // defaults (a write buffer the reader never uses among them) made
        // up most of a session's memory. A large frame grows its buffer:
        // the codec reserves a frame's full length once it has read the
        // prefix.
        *reader.write_buffer_mut() = BytesMut::new();
        if !leftover {
            *reader.read_buffer_mut() = BytesMut::with_capacity(INITIAL_READ_CAPACITY);
        }
        let mut writer = FramedWrite::new(write, Codec::with_max_frame(max));
        *writer.write_buffer_mut() = BytesMut::new();
        (FrameReader { inner: reader }, FrameWriter { inner: writer })
    }

    /// Client side of the handshake: sends `hello` and waits up to `timeout`
    /// for `Welcome`. A `Reject` becomes [`HandshakeError::Rejected`].
    pub async fn client_handshake(
        &mut self,
        hello: Hello,
        timeout: Duration,
    ) -> Result<Welcome, HandshakeError> {
        let exchange = async {
            self.send(hello).await.map_err(ConnectionError::from)?;
            match self.recv().await? {
                Some(Msg::Welcome(welcome)) => Ok(welcome),
                Some(Msg::Reject(reject)) => Err(HandshakeError::Rejected {
                    code: reject.code(),
                    message: reject.message,
                    leader_addr: reject.leader_addr,
                }),
                Some(other) => Err(HandshakeError::Unexpected {
                    expected: "Welcome",
                    got: other.name(),
                }),
                None => Err(HandshakeError::Closed),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(HandshakeError::Timeout(timeout)))
    }

    /// Server side of the handshake, first half: waits up to `timeout` for
    /// a valid `Hello` (right version, a known role) and returns it.
    ///
    /// On any failure a best-effort [`Reject`] with the matching code and
    /// explanation is sent before the error is returned; the caller then
    /// drops the connection. The caller checks what only it can (the token)
    /// and answers with [`Welcome`] or [`Connection::reject`].
    pub async fn accept_hello(&mut self, timeout: Duration) -> Result<Hello, HandshakeError> {
        let outcome = match tokio::time::timeout(timeout, self.recv()).await {
            Err(_) => Err(HandshakeError::Timeout(timeout)),
            Ok(received) => match received {
                Ok(Some(Msg::Hello(hello))) => check_hello(hello),
                Ok(Some(other)) => Err(HandshakeError::Unexpected {
                    expected: "Hello",
                    got: other.name(),
                }),
                Ok(None) => Err(HandshakeError::Closed),
                Err(err) => Err(err.into()),
            },
        };
        if let Err(err) = &outcome
            && !matches!(err, HandshakeError::Closed)
        {
            self.reject(err.reject_code(), err.to_string()).await;
        }
        outcome
    }

    /// Sends a [`Reject`] and flushes it, giving up silently after a short
    /// while: the peer may already be gone or may not read.
    pub async fn reject(&mut self, code: RejectCode, message: impl Into<String>) {
        let reject = Reject {
            code: code as i32,
            message: message.into(),
            ..Reject::default()
        };
        let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, self.send(reject)).await;
    }
}

fn check_hello(hello: Hello) -> Result<Hello, HandshakeError> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(HandshakeError::UnsupportedVersion {
            got: hello.protocol_version,
        });
    }
    match Role::try_from(hello.role) {
        Ok(Role::Runner | Role::Observer | Role::Client) => Ok(hello),
        Ok(Role::Unspecified) | Err(_) => Err(HandshakeError::BadRole(hello.role)),
    }
}

fn next_msg(frame: Option<Result<Envelope, CodecError>>) -> Result<Option<Msg>, ConnectionError> {
    match frame {
        None => Ok(None),
        Some(Err(err)) => Err(err.into()),
        Some(Ok(Envelope { msg: Some(msg) })) => Ok(Some(msg)),
        Some(Ok(Envelope { msg: None })) => Err(ConnectionError::UnknownMessage),
    }
}

/// The receiving half of a [split](Connection::split) connection.
#[derive(Debug)]
pub struct FrameReader<S> {
    // A `Framed` used for reading only: it is the one tokio-util type that
    // can start from a non-empty buffer and decode it first.
    inner: Framed<ReadHalf<S>, Codec>,
}

impl<S: AsyncRead + AsyncWrite> FrameReader<S> {
    /// Receives the next message; `Ok(None)` when the peer closed cleanly.
    pub async fn recv(&mut self) -> Result<Option<Msg>, ConnectionError> {
        next_msg(self.inner.next().await)
    }
}

/// The sending half of a [split](Connection::split) connection.
#[derive(Debug)]
pub struct FrameWriter<S> {
    inner: FramedWrite<WriteHalf<S>, Codec>,
}

impl<S: AsyncRead + AsyncWrite> FrameWriter<S> {
    /// Sends one message and flushes it.
    pub async fn send(&mut self, msg: impl Into<Envelope>) -> Result<(), CodecError> {
        self.inner.send(msg.into()).await
    }

    /// Queues one message without flushing, so several can go out in one
    /// write; call [`flush`](Self::flush) after the last.
    pub async fn feed(&mut self, msg: impl Into<Envelope>) -> Result<(), CodecError> {
        self.inner.feed(msg.into()).await
    }

    /// Writes out everything queued by [`feed`](Self::feed).
    pub async fn flush(&mut self) -> Result<(), CodecError> {
        SinkExt::<Envelope>::flush(&mut self.inner).await?;
        // A burst (a log backlog, a long job list) must not pin its buffer
        // for the rest of a long-lived connection.
        if self.inner.write_buffer().capacity() > RETAINED_WRITE_CAPACITY {
            *self.inner.write_buffer_mut() = BytesMut::new();
        }
        Ok(())
    }
}
