//! Fuzzes the frame decoder: arbitrary bytes, delivered in chunks of a size
//! the input itself picks, must only ever produce envelopes, "need more
//! data", or a `CodecError` — never a panic. A codec that reserved room for
//! a multi-GiB length prefix would also be caught: libFuzzer's
//! `-malloc_limit_mb` (default 2048) reports any single larger allocation.
//! It does not exercise I/O or the handshake.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use surveil_proto::{Codec, CodecError, Envelope};
use tokio_util::codec::{Decoder, Encoder};

/// A small limit as well as the default one, so inputs a fuzzer can reach
/// (a few KiB) also hit the frame-too-large path with plausible prefixes.
const SMALL_MAX_FRAME: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // Chunk sizes 1..=128, so both byte-at-a-time delivery and frames that
    // arrive several at once are covered.
    let chunk = usize::from(first & 0x7f) + 1;
    let max_frame = if first & 0x80 == 0 {
        surveil_proto::DEFAULT_MAX_FRAME
    } else {
        SMALL_MAX_FRAME
    };
    run(rest, chunk, max_frame);
});

fn run(input: &[u8], chunk: usize, max_frame: usize) {
    let mut codec = Codec::with_max_frame(max_frame);
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        // Drain every complete frame; stop at the first error, as a
        // connection would (the stream is out of step after one).
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(envelope)) => round_trip(&envelope),
                Ok(None) => break,
                Err(err) => {
                    check_error(&err, max_frame);
                    return;
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(envelope)) => round_trip(&envelope),
            Ok(None) => break,
            Err(err) => {
                check_error(&err, max_frame);
                break;
            }
        }
    }
}

/// Whatever decoded must survive encode → decode unchanged. (Re-encoding
/// may be longer than the input — prost writes repeated scalars packed — so
/// it uses the default limit, far above any fuzzer input.)
fn round_trip(envelope: &Envelope) {
    let mut codec = Codec::new();
    let mut buf = BytesMut::new();
    codec
        .encode(envelope, &mut buf)
        .expect("a decoded envelope re-encodes");
    let again = codec
        .decode(&mut buf)
        .expect("a re-encoded envelope decodes")
        .expect("a re-encoded envelope is one whole frame");
    assert_eq!(&again, envelope);
    assert!(buf.is_empty());
}

fn check_error(err: &CodecError, max_frame: usize) {
    match err {
        CodecError::FrameTooLarge { len, max } => {
            assert_eq!(*max, max_frame);
            assert!(*len > max_frame as u64, "FrameTooLarge for {len} <= {max}");
        }
        CodecError::Truncated { buffered } => assert!(*buffered > 0),
        CodecError::Decode(_) | CodecError::Io(_) => {}
    }
}
