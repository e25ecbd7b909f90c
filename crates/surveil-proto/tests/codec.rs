//! The frame codec on its own, with no I/O: round trips, frames split at
//! every byte, the size limit in both directions, truncation and garbage.

mod common;

use bytes::{BufMut, BytesMut};
use common::{encode_stream, every_message, raw_frame};
use proptest::prelude::*;
use surveil_proto::*;
use tokio_util::codec::{Decoder, Encoder};

/// Decodes every complete frame in `buf`.
fn drain(codec: &mut Codec, buf: &mut BytesMut) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Some(envelope) = codec.decode(buf).expect("valid stream decodes") {
        out.push(envelope);
    }
    out
}

fn envelopes(msgs: &[Msg]) -> Vec<Envelope> {
    msgs.iter().cloned().map(Envelope::from).collect()
}

#[test]
fn every_message_round_trips_through_the_codec() {
    for msg in every_message() {
        let mut codec = Codec::new();
        let mut buf = BytesMut::new();
        codec.encode(Envelope::from(msg.clone()), &mut buf).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - LENGTH_PREFIX_LEN, "{}: prefix", msg.name());
        let decoded = codec.decode(&mut buf).unwrap();
        assert_eq!(decoded, Some(Envelope::from(msg.clone())), "{}", msg.name());
        assert!(buf.is_empty(), "{}: leftover bytes", msg.name());
    }
}

#[test]
fn encoding_by_reference_writes_the_same_bytes() {
    let envelope = Envelope::from(every_message().swap_remove(0));
    let (mut by_value, mut by_ref) = (BytesMut::new(), BytesMut::new());
    Codec::new()
        .encode(envelope.clone(), &mut by_value)
        .unwrap();
    Codec::new().encode(&envelope, &mut by_ref).unwrap();
    assert_eq!(by_value, by_ref);
}

#[test]
fn ping_frame_has_the_documented_bytes() {
    // docs/protocol.md shows these bytes as the worked example.
    let mut buf = BytesMut::new();
    Codec::new()
        .encode(Envelope::from(Ping { seq: 1 }), &mut buf)
        .unwrap();
    // prefix 5; key 0xaa 0x01 = field 21 (ping), wire type 2; length 2;
    // Ping's key 0x08 = field 1 (seq), varint; value 1.
    assert_eq!(
        &buf[..],
        &[0x00, 0x00, 0x00, 0x05, 0xaa, 0x01, 0x02, 0x08, 0x01]
    );
}

#[test]
fn a_stream_split_at_every_byte_offset_decodes_the_same() {
    let msgs = every_message();
    let expected = envelopes(&msgs);
    let stream = encode_stream(&msgs);
    for cut in 0..=stream.len() {
        let mut codec = Codec::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&stream[..cut]);
        let mut got = drain(&mut codec, &mut buf);
        buf.extend_from_slice(&stream[cut..]);
        got.extend(drain(&mut codec, &mut buf));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None, "cut at {cut}");
        assert_eq!(got, expected, "cut at {cut}");
    }
}

#[test]
fn a_stream_fed_one_byte_at_a_time_decodes_the_same() {
    let msgs = every_message();
    let stream = encode_stream(&msgs);
    let mut codec = Codec::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in stream.iter() {
        buf.put_u8(*byte);
        got.extend(drain(&mut codec, &mut buf));
    }
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    assert_eq!(got, envelopes(&msgs));
}

#[test]
fn a_frame_body_that_looks_like_a_huge_prefix_is_not_mistaken_for_one() {
    // Regression: once a frame's prefix was consumed, the next decode call
    // read the first body bytes as a new prefix. A Ping body starts 0xaa,
    // far over any limit as a big-endian u32.
    let stream = encode_stream(&[Msg::Ping(Ping { seq: u64::MAX })]);
    let mut codec = Codec::with_max_frame(64);
    let mut buf = BytesMut::from(&stream[..LENGTH_PREFIX_LEN + 1]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&stream[LENGTH_PREFIX_LEN + 1..LENGTH_PREFIX_LEN + 6]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&stream[LENGTH_PREFIX_LEN + 6..]);
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(Envelope::from(Ping { seq: u64::MAX }))
    );
}

#[test]
fn an_empty_frame_decodes_to_an_empty_envelope() {
    // The codec accepts it; `Connection` reports it as UnknownMessage.
    let mut buf = BytesMut::from(&raw_frame(&[])[..]);
    let decoded = Codec::new().decode(&mut buf).unwrap();
    assert_eq!(decoded, Some(Envelope { msg: None }));
}

/// Feeds `prefix` (and a few body bytes) to a codec with limit `max` and
/// returns the error and the buffer's capacity afterwards.
fn decode_oversized(prefix: u32, max: usize) -> (CodecError, usize) {
    let mut codec = Codec::with_max_frame(max);
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u32(prefix);
    buf.extend_from_slice(b"\x0a\x02hi");
    let err = codec.decode(&mut buf).expect_err("over the limit");
    (err, buf.capacity())
}

#[test]
fn a_length_prefix_over_the_limit_is_refused_without_allocating_it() {
    let cases = [
        (u32::MAX, DEFAULT_MAX_FRAME),
        (DEFAULT_MAX_FRAME as u32 + 1, DEFAULT_MAX_FRAME),
        (u32::MAX, 1024),
        (1025, 1024),
        (1, 0),
    ];
    for (prefix, max) in cases {
        let (err, capacity) = decode_oversized(prefix, max);
        match err {
            CodecError::FrameTooLarge { len, max: limit } => {
                assert_eq!(len, u64::from(prefix));
                assert_eq!(limit, max);
            }
            other => panic!("prefix {prefix}, limit {max}: got {other:?}"),
        }
        // The buffer was never grown towards the claimed size.
        assert!(
            capacity <= 64,
            "prefix {prefix}: capacity grew to {capacity}"
        );
    }
}

#[test]
fn a_prefix_over_the_limit_fails_as_soon_as_the_prefix_arrives() {
    // No waiting for a body that will never be accepted.
    let mut buf = BytesMut::new();
    buf.put_u32(2048);
    let err = Codec::with_max_frame(1024).decode(&mut buf).unwrap_err();
    assert!(matches!(
        err,
        CodecError::FrameTooLarge {
            len: 2048,
            max: 1024
        }
    ));
    assert_eq!(err.reject_code(), RejectCode::FrameTooLarge);
    assert_eq!(
        err.to_string(),
        "frame of 2048 bytes exceeds the limit of 1024 bytes"
    );
}

#[test]
fn a_frame_exactly_at_the_limit_is_accepted() {
    let msg = Envelope::from(Ping { seq: 300 });
    let len = prost::Message::encoded_len(&msg);
    let mut codec = Codec::with_max_frame(len);
    let mut buf = BytesMut::new();
    codec.encode(&msg, &mut buf).unwrap();
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg));
}

#[test]
fn limits_above_u32_are_lowered_to_what_a_prefix_can_say() {
    assert_eq!(
        Codec::with_max_frame(usize::MAX).max_frame(),
        u32::MAX as usize
    );
    assert_eq!(Codec::new().max_frame(), DEFAULT_MAX_FRAME);
    assert_eq!(Codec::default().max_frame(), DEFAULT_MAX_FRAME);
}

#[test]
fn an_encoded_frame_over_the_limit_fails_before_anything_is_written() {
    let log = Envelope::from(Log {
        job_id: 1,
        attempt: 1,
        data: vec![b'x'; 100].into(),
        ..Log::default()
    });
    let mut codec = Codec::with_max_frame(64);
    let mut dst = BytesMut::from(&b"earlier"[..]);
    let err = codec.encode(&log, &mut dst).unwrap_err();
    match err {
        CodecError::FrameTooLarge { len, max } => {
            assert_eq!(len, prost::Message::encoded_len(&log) as u64);
            assert_eq!(max, 64);
        }
        other => panic!("got {other:?}"),
    }
    assert_eq!(&dst[..], b"earlier", "nothing appended");
}

#[test]
fn a_stream_cut_anywhere_inside_a_frame_is_truncated_at_eof() {
    let stream = encode_stream(&[Msg::Ping(Ping { seq: 1 }), every_message().swap_remove(0)]);
    let first_len = encode_stream(&[Msg::Ping(Ping { seq: 1 })]).len();
    for cut in 1..stream.len() {
        let mut codec = Codec::new();
        let mut buf = BytesMut::from(&stream[..cut]);
        let mut decoded = drain(&mut codec, &mut buf).len();
        let eof = loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(_)) => decoded += 1,
                other => break other,
            }
        };
        if cut == first_len {
            // Exactly between two frames: a clean end.
            assert!(matches!(eof, Ok(None)), "cut at {cut}: {eof:?}");
            assert_eq!(decoded, 1);
            continue;
        }
        let frame_start = if cut > first_len { first_len } else { 0 };
        match eof {
            Err(CodecError::Truncated { buffered }) => {
                assert_eq!(buffered, cut - frame_start, "cut at {cut}")
            }
            other => panic!("cut at {cut}: got {other:?}"),
        }
    }
}

#[test]
fn undecodable_bodies_are_decode_errors() {
    let bodies: [&[u8]; 4] = [
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", // varint too long
        b"\x0a\x05ab",                                   // length past the end
        b"\x0a\x03\x1a\x01\xff",                         // Hello.name not UTF-8
        b"\x07",                                         // wire type 7 does not exist
    ];
    for body in bodies {
        let mut buf = BytesMut::from(&raw_frame(body)[..]);
        let err = Codec::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{body:?}: {err:?}");
        assert_eq!(err.reject_code(), RejectCode::ProtocolError);
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    ".{0,24}"
}

prop_compose! {
    fn arb_hello()(
        protocol_version in any::<u32>(),
        role in any::<i32>(),
        name in arb_string(),
        token in arb_string(),
        slots in any::<u32>(),
        labels in prop::collection::vec(arb_string(), 0..4),
        repos in prop::collection::vec(arb_string(), 0..4),
        leases in prop::collection::vec((any::<u64>(), any::<u32>()), 0..4),
        client_version in arb_string(),
        epoch in arb_string(),
    ) -> Hello {
        Hello {
            protocol_version, role, name, token, slots, labels, repos,
            leases: leases.into_iter().map(|(job_id, attempt)| Lease { job_id, attempt }).collect(),
            client_version,
            epoch,
        }
    }
}

prop_compose! {
    fn arb_log()(
        job_id in any::<u64>(),
        attempt in any::<u32>(),
        task in any::<u32>(),
        stream in any::<i32>(),
        offset in any::<u64>(),
        data in prop::collection::vec(any::<u8>(), 0..256),
    ) -> Log {
        Log { job_id, attempt, task, stream, offset, data: data.into() }
    }
}

prop_compose! {
    fn arb_task_result()(
        name in arb_string(),
        status in any::<i32>(),
        exit_code in any::<Option<i32>>(),
        signal in any::<Option<i32>>(),
        duration_ms in any::<u64>(),
        message in arb_string(),
    ) -> TaskResult {
        TaskResult { name, status, exit_code, signal, duration_ms, message, ..TaskResult::default() }
    }
}

prop_compose! {
    fn arb_job_finished()(
        job_id in any::<u64>(),
        attempt in any::<u32>(),
        status in any::<i32>(),
        message in arb_string(),
        tasks in prop::collection::vec(arb_task_result(), 0..5),
        infrastructure in any::<bool>(),
        commit in arb_string(),
    ) -> JobFinished {
        JobFinished { job_id, attempt, status, message, tasks, infrastructure, commit }
    }
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        arb_hello().prop_map(Msg::Hello),
        arb_log().prop_map(Msg::Log),
        arb_job_finished().prop_map(Msg::JobFinished),
    ]
}

/// Which outcomes garbage may have: anything but a panic or an I/O error.
fn assert_clean_error(err: &CodecError) {
    assert!(
        matches!(
            err,
            CodecError::Decode(_) | CodecError::FrameTooLarge { .. } | CodecError::Truncated { .. }
        ),
        "unexpected error kind: {err:?}"
    );
}

proptest! {
    #[test]
    fn arbitrary_messages_round_trip(msgs in prop::collection::vec(arb_msg(), 1..6), chunk in 1usize..64) {
        let stream = encode_stream(&msgs);
        let mut codec = Codec::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            got.extend(drain(&mut codec, &mut buf));
        }
        prop_assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
        prop_assert_eq!(got, envelopes(&msgs));
    }

    #[test]
    fn garbage_never_panics(
        garbage in prop::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..64,
        small_limit in any::<bool>(),
    ) {
        let max = if small_limit { 32 } else { DEFAULT_MAX_FRAME };
        let mut codec = Codec::with_max_frame(max);
        let mut buf = BytesMut::new();
        'feed: for piece in garbage.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(err) => {
                        assert_clean_error(&err);
                        break 'feed;
                    }
                }
            }
        }
        // Whatever state it is in, end of stream is answered cleanly too.
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(err) => {
                    assert_clean_error(&err);
                    break;
                }
            }
        }
    }

    #[test]
    fn garbage_after_a_valid_prefix_is_a_decode_error_or_more_data(
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut buf = BytesMut::from(&raw_frame(&body)[..]);
        match Codec::new().decode(&mut buf) {
            Ok(Some(_)) => prop_assert!(buf.is_empty()),
            Ok(None) => prop_assert!(false, "a whole frame was buffered"),
            Err(err) => prop_assert!(matches!(err, CodecError::Decode(_)), "{:?}", err),
        }
    }
}
