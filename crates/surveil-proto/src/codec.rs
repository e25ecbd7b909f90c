//! Frames ↔ [`Envelope`]s: the 4-byte big-endian length prefix, the size
//! limit, and protobuf decoding. No I/O of its own; tokio-util drives it.

use std::io;

use bytes::{BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::v1::{Envelope, RejectCode};

/// The default largest frame body accepted or sent: 8 MiB.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// The most bytes one `Log` message may carry in `data` (the contract's
/// 64 KiB). A runner splits longer output; a dispatcher drops a longer
/// chunk (and logs why) instead of storing it.
///
/// ```
/// let output = vec![b'x'; 100_000];
/// let chunks: Vec<_> = output.chunks(surveil_proto::MAX_LOG_CHUNK).collect();
/// assert_eq!(chunks.len(), 2);
/// ```
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// Bytes in the length prefix of every frame.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// What can go wrong turning bytes into [`Envelope`]s or back.
///
/// After any error from [`Codec::decode`] the stream is out of step and the
/// connection must be closed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame's length prefix (incoming) or encoded size (outgoing) is over
    /// the limit. Nothing was allocated for it, and nothing was written.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame body's length in bytes.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The frame body is not a valid protobuf `Envelope`.
    #[error("frame is not a valid surveil.v1.Envelope: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The stream ended part-way through a frame.
    #[error("connection closed mid-frame ({buffered} bytes of an unfinished frame received)")]
    Truncated {
        /// Bytes of the unfinished frame (prefix included) that had arrived.
        buffered: usize,
    },
    /// Reading or writing the underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl CodecError {
    /// The [`RejectCode`] a dispatcher answers with when this error happens
    /// during the handshake.
    ///
    /// ```
    /// use surveil_proto::{CodecError, RejectCode};
    /// let err = CodecError::FrameTooLarge { len: 1 << 32, max: 1024 };
    /// assert_eq!(err.reject_code(), RejectCode::FrameTooLarge);
    /// ```
    pub fn reject_code(&self) -> RejectCode {
        match self {
            CodecError::FrameTooLarge { .. } => RejectCode::FrameTooLarge,
            _ => RejectCode::ProtocolError,
        }
    }
}

/// The Surveil frame codec: a [`Decoder`] and [`Encoder`] of [`Envelope`]s
/// over 4-byte big-endian length-prefixed frames.
///
/// ```
/// use bytes::BytesMut;
/// use surveil_proto::{Codec, Envelope, Ping};
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = Codec::new();
/// let mut buf = BytesMut::new();
/// codec.encode(Envelope::from(Ping { seq: 3 }), &mut buf).unwrap();
/// assert_eq!(&buf[..4], &[0, 0, 0, 5]); // length prefix, then 5 bytes
/// let decoded = codec.decode(&mut buf).unwrap().unwrap();
/// assert_eq!(decoded, Envelope::from(Ping { seq: 3 }));
/// ```
#[derive(Debug)]
pub struct Codec {
    frames: LengthDelimitedCodec,
    max_frame: usize,
    /// True while `frames` has consumed a frame's prefix and waits for its
    /// body: the bytes at the front of the buffer are then body, not a
    /// prefix to check.
    in_body: bool,
}

impl Codec {
    /// A codec with the [`DEFAULT_MAX_FRAME`] limit.
    pub fn new() -> Self {
        Self::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A codec that refuses frame bodies longer than `max_frame` bytes, in
    /// both directions.
    /// Limits above `u32::MAX` are lowered to it, the most a prefix can say.
    pub fn with_max_frame(max_frame: usize) -> Self {
        let max_frame = max_frame.min(u32::MAX as usize);
        let frames = LengthDelimitedCodec::builder()
            .length_field_length(LENGTH_PREFIX_LEN)
            .big_endian()
            .max_frame_length(max_frame)
            .new_codec();
        Codec {
            frames,
            max_frame,
            in_body: false,
        }
    }

    /// The largest frame body this codec accepts or sends.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the limit from the next frame on, keeping a frame already
    /// being read (so a server can take a small limit until the handshake
    /// is done, then its full one).
    ///
    /// ```
    /// let mut codec = surveil_proto::Codec::with_max_frame(64 * 1024);
    /// codec.set_max_frame(8 * 1024 * 1024);
    /// assert_eq!(codec.max_frame(), 8 * 1024 * 1024);
    /// ```
    pub fn set_max_frame(&mut self, max_frame: usize) {
        let max_frame = max_frame.min(u32::MAX as usize);
        self.frames.set_max_frame_length(max_frame);
        self.max_frame = max_frame;
    }
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for Codec {
    type Item = Envelope;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, CodecError> {
        // Check the prefix ourselves so the error carries the length, and so
        // nothing is reserved for a frame we will refuse anyway.
        let mut reads_prefix = false;
        if !self.in_body
            && let Some(prefix) = src.get(..LENGTH_PREFIX_LEN)
        {
            let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
            if len as usize > self.max_frame {
                return Err(CodecError::FrameTooLarge {
                    len: u64::from(len),
                    max: self.max_frame,
                });
            }
            reads_prefix = true;
        }
        match self.frames.decode(src)? {
            Some(body) => {
                self.in_body = false;
                Ok(Some(Envelope::decode(body.freeze())?))
            }
            None => {
                // `frames` consumes a whole prefix as soon as it is there,
                // then waits for the body across calls.
                self.in_body |= reads_prefix;
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && !self.in_body => Ok(None),
            // The prefix of an unfinished frame has already left `src`.
            None if self.in_body => Err(CodecError::Truncated {
                buffered: LENGTH_PREFIX_LEN + src.len(),
            }),
            None => Err(CodecError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Envelope> for Codec {
    type Error = CodecError;

    fn encode(&mut self, item: Envelope, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&item, dst)
    }
}

impl Encoder<&Envelope> for Codec {
    type Error = CodecError;

    fn encode(&mut self, item: &Envelope, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = item.encoded_len();
        if len > self.max_frame {
            return Err(CodecError::FrameTooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        // Encode straight into the output buffer: no intermediate copy.
        dst.reserve(LENGTH_PREFIX_LEN + len);
        dst.put_u32(u32::try_from(len).expect("max_frame fits in u32"));
        item.encode(dst)
            .map_err(|e| io::Error::other(format!("protobuf encoding failed: {e}")))?;
        Ok(())
    }
}
