//! `Connection` over in-memory pipes: receiving, truncation, unknown arms,
//! both sides of the handshake with every reject code it can produce, and
//! `split()`.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{encode_stream, raw_frame};
use surveil_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

const TIMEOUT: Duration = Duration::from_secs(5);

fn pipe() -> (Connection<DuplexStream>, Connection<DuplexStream>) {
    let (a, b) = duplex(64 * 1024);
    (Connection::new(a), Connection::new(b))
}

fn runner_hello() -> Hello {
    let mut hello = Hello::new(Role::Runner, "ci-1");
    hello.slots = 1;
    hello.repos = vec!["/srv/git/app".into()];
    hello
}

fn welcome() -> Welcome {
    Welcome {
        session_id: "s-1".into(),
        heartbeat_interval_ms: 1000,
        runner_timeout_ms: 5000,
        server_version: "test".into(),
        epoch: String::new(),
    }
}

/// Runs `accept_hello` on a server connection while the client end writes
/// `first` as raw bytes; returns the server's error and what the client
/// received afterwards.
async fn server_rejects(first: Vec<u8>) -> (HandshakeError, Option<Msg>) {
    let (mut client, server) = duplex(64 * 1024);
    let mut server = Connection::new(server);
    let accept = tokio::spawn(async move { server.accept_hello(TIMEOUT).await });
    client.write_all(&first).await.unwrap();
    let err = accept.await.unwrap().expect_err("the handshake must fail");
    let mut client = Connection::new(client);
    let reply = client.recv().await.expect("the Reject is a valid frame");
    (err, reply)
}

fn reject_code(reply: Option<Msg>) -> (RejectCode, String) {
    match reply {
        Some(Msg::Reject(reject)) => (reject.code(), reject.message),
        other => panic!("expected a Reject, got {other:?}"),
    }
}

fn frame_of(msg: impl Into<Envelope>) -> Vec<u8> {
    encode_stream(&[msg.into().msg.unwrap()]).to_vec()
}

#[tokio::test]
async fn every_message_crosses_a_connection() {
    let (mut a, mut b) = pipe();
    let msgs = common::every_message();
    let expected = msgs.clone();
    let sender = tokio::spawn(async move {
        for msg in msgs {
            a.send(msg).await.unwrap();
        }
    });
    for want in expected {
        assert_eq!(b.recv().await.unwrap(), Some(want));
    }
    sender.await.unwrap();
    assert_eq!(
        b.recv().await.unwrap(),
        None,
        "clean close after the last frame"
    );
}

#[tokio::test]
async fn a_stream_cut_mid_frame_is_truncated_not_a_clean_close() {
    let frame = frame_of(Ping { seq: 99 });
    // Inside the prefix, right after it, and inside the body.
    for cut in [2, LENGTH_PREFIX_LEN, frame.len() - 1] {
        let (mut raw, other) = duplex(1024);
        let mut conn = Connection::new(other);
        raw.write_all(&frame[..cut]).await.unwrap();
        drop(raw);
        match conn.recv().await {
            Err(ConnectionError::Codec(CodecError::Truncated { buffered })) => {
                assert_eq!(buffered, cut)
            }
            other => panic!("cut at {cut}: got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unknown_oneof_arm_is_an_unknown_message() {
    // Field 99, wire type 2 (a message), empty: what a newer peer's new
    // message looks like to this version.
    let body = [0x9a, 0x06, 0x00];
    for frame in [raw_frame(&body), raw_frame(&[])] {
        let (mut raw, other) = duplex(1024);
        let mut conn = Connection::new(other);
        raw.write_all(&frame).await.unwrap();
        assert!(
            matches!(conn.recv().await, Err(ConnectionError::UnknownMessage)),
            "{frame:?}"
        );
    }
}

#[tokio::test]
async fn an_oversized_send_writes_nothing() {
    let (a, mut b) = duplex(64 * 1024);
    let mut conn = Connection::with_codec(a, Codec::with_max_frame(32));
    let big = Log {
        data: vec![0; 64].into(),
        ..Log::default()
    };
    let err = conn.send(big).await.unwrap_err();
    assert!(
        matches!(err, CodecError::FrameTooLarge { max: 32, .. }),
        "{err:?}"
    );
    conn.send(Ping { seq: 5 }).await.unwrap();
    drop(conn);
    let mut received = Vec::new();
    b.read_to_end(&mut received).await.unwrap();
    assert_eq!(received, frame_of(Ping { seq: 5 }), "only the small frame");
}

#[tokio::test]
async fn handshake_succeeds_and_the_server_sees_the_hello() {
    let (mut client, mut server) = pipe();
    let server = tokio::spawn(async move {
        let hello = server.accept_hello(TIMEOUT).await.unwrap();
        server.send(welcome()).await.unwrap();
        hello
    });
    let got = client
        .client_handshake(runner_hello(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(got, welcome());
    let hello = server.await.unwrap();
    assert_eq!(hello, runner_hello());
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hello.client_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn a_reject_surfaces_with_its_code_and_message() {
    let (mut client, mut server) = pipe();
    tokio::spawn(async move {
        server.accept_hello(TIMEOUT).await.unwrap();
        server
            .reject(RejectCode::BadToken, "token does not match")
            .await;
    });
    let err = client
        .client_handshake(runner_hello(), TIMEOUT)
        .await
        .unwrap_err();
    match &err {
        HandshakeError::Rejected { code, message, .. } => {
            assert_eq!(*code, RejectCode::BadToken);
            assert_eq!(message, "token does not match");
        }
        other => panic!("got {other:?}"),
    }
    assert_eq!(err.reject_code(), RejectCode::BadToken);
    let text = err.to_string();
    assert!(
        text.contains("REJECT_CODE_BAD_TOKEN") && text.contains("token does not match"),
        "{text}"
    );
}

#[tokio::test]
async fn client_handshake_reports_a_wrong_first_answer_and_a_close() {
    let (mut client, mut server) = pipe();
    tokio::spawn(async move {
        server.accept_hello(TIMEOUT).await.unwrap();
        server.send(Ping { seq: 1 }).await.unwrap();
    });
    let err = client
        .client_handshake(runner_hello(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::Unexpected {
                expected: "Welcome",
                got: "Ping"
            }
        ),
        "{err:?}"
    );

    let (mut client, mut server) = pipe();
    tokio::spawn(async move {
        server.accept_hello(TIMEOUT).await.unwrap();
        drop(server);
    });
    let err = client
        .client_handshake(runner_hello(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::Closed), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn client_handshake_times_out_when_the_server_is_silent() {
    let (mut client, _server) = pipe();
    let err = client
        .client_handshake(runner_hello(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandshakeError::Timeout(t) if t == TIMEOUT),
        "{err:?}"
    );
}

#[tokio::test]
async fn garbage_first_frame_gets_protocol_error() {
    let (err, reply) =
        server_rejects(raw_frame(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")).await;
    assert!(
        matches!(
            err,
            HandshakeError::Connection(ConnectionError::Codec(CodecError::Decode(_)))
        ),
        "{err:?}"
    );
    let (code, message) = reject_code(reply);
    assert_eq!(code, RejectCode::ProtocolError);
    assert!(
        message.contains("not a valid surveil.v1.Envelope"),
        "{message}"
    );
}

#[tokio::test]
async fn an_empty_first_frame_gets_protocol_error() {
    let (err, reply) = server_rejects(raw_frame(&[])).await;
    assert!(
        matches!(
            err,
            HandshakeError::Connection(ConnectionError::UnknownMessage)
        ),
        "{err:?}"
    );
    assert_eq!(reject_code(reply).0, RejectCode::ProtocolError);
}

#[tokio::test]
async fn an_oversized_first_prefix_gets_frame_too_large() {
    // An HTTP request is what a stray client most often sends: "GET " read
    // as a length is about 1.2 GB.
    let (err, reply) = server_rejects(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert!(
        matches!(
            err,
            HandshakeError::Connection(ConnectionError::Codec(CodecError::FrameTooLarge {
                len: 0x4745_5420,
                max: DEFAULT_MAX_FRAME
            }))
        ),
        "{err:?}"
    );
    let (code, message) = reject_code(reply);
    assert_eq!(code, RejectCode::FrameTooLarge);
    assert!(message.contains("exceeds the limit"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn silence_gets_handshake_timeout() {
    let (err, reply) = server_rejects(Vec::new()).await;
    assert!(
        matches!(err, HandshakeError::Timeout(t) if t == TIMEOUT),
        "{err:?}"
    );
    assert_eq!(reject_code(reply).0, RejectCode::HandshakeTimeout);
}

#[tokio::test(start_paused = true)]
async fn a_partial_hello_is_silence_too() {
    let hello = frame_of(runner_hello());
    let (err, reply) = server_rejects(hello[..hello.len() - 1].to_vec()).await;
    assert!(matches!(err, HandshakeError::Timeout(_)), "{err:?}");
    assert_eq!(reject_code(reply).0, RejectCode::HandshakeTimeout);
}

#[tokio::test]
async fn a_wrong_version_gets_unsupported_version() {
    let mut hello = runner_hello();
    hello.protocol_version = 2;
    let (err, reply) = server_rejects(frame_of(hello)).await;
    assert!(
        matches!(err, HandshakeError::UnsupportedVersion { got: 2 }),
        "{err:?}"
    );
    let (code, message) = reject_code(reply);
    assert_eq!(code, RejectCode::UnsupportedVersion);
    assert!(message.contains("protocol version 2"), "{message}");
}

#[tokio::test]
async fn a_missing_or_unknown_role_gets_bad_role() {
    for role in [Role::Unspecified as i32, 42] {
        let mut hello = runner_hello();
        hello.role = role;
        let (err, reply) = server_rejects(frame_of(hello)).await;
        assert!(
            matches!(err, HandshakeError::BadRole(r) if r == role),
            "{err:?}"
        );
        assert_eq!(reject_code(reply).0, RejectCode::BadRole);
    }
}

#[tokio::test]
async fn every_known_role_is_accepted() {
    for role in [Role::Runner, Role::Observer, Role::Client] {
        let (mut client, mut server) = pipe();
        client.send(Hello::new(role, "x")).await.unwrap();
        let hello = server.accept_hello(TIMEOUT).await.unwrap();
        assert_eq!(hello.role(), role);
    }
}

#[tokio::test]
async fn a_first_message_other_than_hello_gets_protocol_error() {
    let (err, reply) = server_rejects(frame_of(Ping { seq: 1 })).await;
    assert!(
        matches!(
            err,
            HandshakeError::Unexpected {
                expected: "Hello",
                got: "Ping"
            }
        ),
        "{err:?}"
    );
    assert_eq!(reject_code(reply).0, RejectCode::ProtocolError);
}

#[tokio::test]
async fn a_client_that_leaves_at_once_gets_no_reject() {
    let (client, server) = duplex(1024);
    let mut server = Connection::new(server);
    drop(client);
    let err = server.accept_hello(TIMEOUT).await.unwrap_err();
    assert!(matches!(err, HandshakeError::Closed), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_does_not_hold_up_reject() {
    // A pipe too small for the Reject: the write must give up, not hang.
    let (mut client, server) = duplex(8);
    let mut server = Connection::new(server);
    client
        .write_all(&frame_of(Ping { seq: 1 })[..8])
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let accept = server.accept_hello(TIMEOUT);
    let err = tokio::time::timeout(Duration::from_secs(60), accept)
        .await
        .expect("accept_hello returns although the peer does not read")
        .unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test]
async fn split_keeps_frames_already_buffered() {
    let (client, mut server) = duplex(64 * 1024);
    // Welcome and two more frames arrive in one write, so the handshake's
    // read buffers all three before split() is called.
    let mut burst = BytesMut::new();
    burst.extend_from_slice(&frame_of(welcome()));
    burst.extend_from_slice(&frame_of(Ping { seq: 1 }));
    burst.extend_from_slice(&frame_of(Cancel {
        job_id: 3,
        attempt: 1,
    }));
    server.write_all(&burst).await.unwrap();

    let mut conn = Connection::new(client);
    conn.client_handshake(runner_hello(), TIMEOUT)
        .await
        .unwrap();
    let (mut reader, mut writer) = conn.split();
    assert_eq!(
        reader.recv().await.unwrap(),
        Some(Msg::Ping(Ping { seq: 1 }))
    );
    assert_eq!(
        reader.recv().await.unwrap(),
        Some(Msg::Cancel(Cancel {
            job_id: 3,
            attempt: 1
        }))
    );

    // The writer half still frames correctly, batched or not.
    writer.feed(Pong { seq: 1 }).await.unwrap();
    writer
        .feed(Started {
            job_id: 3,
            attempt: 1,
        })
        .await
        .unwrap();
    writer.flush().await.unwrap();
    writer.send(Pong { seq: 2 }).await.unwrap();
    let mut server = Connection::new(server);
    assert!(matches!(server.recv().await.unwrap(), Some(Msg::Hello(_))));
    assert_eq!(
        server.recv().await.unwrap(),
        Some(Msg::Pong(Pong { seq: 1 }))
    );
    assert_eq!(
        server.recv().await.unwrap(),
        Some(Msg::Started(Started {
            job_id: 3,
            attempt: 1
        }))
    );
    assert_eq!(
        server.recv().await.unwrap(),
        Some(Msg::Pong(Pong { seq: 2 }))
    );

    drop(server);
    assert_eq!(reader.recv().await.unwrap(), None);
}

#[tokio::test]
async fn split_keeps_the_frame_limit() {
    let (a, mut b) = duplex(64 * 1024);
    let conn = Connection::with_codec(a, Codec::with_max_frame(16));
    let (mut reader, mut writer) = conn.split();
    let big = Log {
        data: vec![0; 32].into(),
        ..Log::default()
    };
    assert!(matches!(
        writer.send(big.clone()).await,
        Err(CodecError::FrameTooLarge { max: 16, .. })
    ));
    b.write_all(&frame_of(big)).await.unwrap();
    assert!(matches!(
        reader.recv().await,
        Err(ConnectionError::Codec(CodecError::FrameTooLarge {
            max: 16,
            ..
        }))
    ));
}

#[tokio::test(start_paused = true)]
async fn split_after_an_abandoned_recv_resumes_the_frame_in_flight() {
    // A recv given up on (a timeout in a select!) may have consumed half a
    // frame, prefix included; the split reader must carry on from there.
    let (client, mut server) = duplex(64 * 1024);
    let mut conn = Connection::new(client);
    let frame = frame_of(Assign {
        job_id: 4,
        attempt: 2,
        repo: "/srv/git/app".into(),
        branch: "main".into(),
        commit: common::commit('e'),
        ..Assign::default()
    });
    server
        .write_all(&frame[..LENGTH_PREFIX_LEN + 3])
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(1), conn.recv()).await;
    assert!(waited.is_err(), "half a frame is not a message");

    let (mut reader, _writer) = conn.split();
    server
        .write_all(&frame[LENGTH_PREFIX_LEN + 3..])
        .await
        .unwrap();
    match reader.recv().await.unwrap() {
        Some(Msg::Assign(assign)) => assert_eq!((assign.job_id, assign.attempt), (4, 2)),
        other => panic!("got {other:?}"),
    }
}

/// Sends two messages in order over a split writer.
async fn send_two(
    writer: &mut FrameWriter<DuplexStream>,
    first: impl Into<Envelope>,
    second: impl Into<Envelope>,
) {
    writer.send(first).await.unwrap();
    writer.send(second).await.unwrap();
}

/// Receives the next two messages from a split reader.
async fn recv_two(reader: &mut FrameReader<DuplexStream>) -> (Option<Msg>, Option<Msg>) {
    let first = reader.recv().await.unwrap();
    let second = reader.recv().await.unwrap();
    (first, second)
}

#[tokio::test]
async fn split_halves_carry_frames_far_larger_than_their_first_buffers() {
    // Split connections start with small buffers; a 1 MiB log chunk must
    // still cross both ways, between small frames, byte for byte.
    let (a, b) = pipe();
    let (mut a_reader, mut a_writer) = a.split();
    let (mut b_reader, mut b_writer) = b.split();
    let chunk = |seed: u8| Log {
        job_id: 9,
        attempt: 1,
        offset: u64::from(seed),
        data: (0..1 << 20)
            .map(|i: u32| (i as u8).wrapping_mul(seed))
            .collect::<Vec<u8>>()
            .into(),
        ..Log::default()
    };
    for seed in 1..=3u8 {
        let seq = u64::from(seed);
        let (sent_a, sent_b) = (chunk(seed), chunk(seed + 100));
        let ((), (), got_b, got_a) = tokio::time::timeout(TIMEOUT, async {
            tokio::join!(
                send_two(&mut a_writer, sent_a.clone(), Ping { seq }),
                send_two(&mut b_writer, sent_b.clone(), Pong { seq }),
                recv_two(&mut b_reader),
                recv_two(&mut a_reader),
            )
        })
        .await
        .expect("frames crossed in time");
        assert_eq!(got_b.0, Some(Msg::Log(sent_a)));
        assert_eq!(got_b.1, Some(Msg::Ping(Ping { seq })));
        assert_eq!(got_a.0, Some(Msg::Log(sent_b)));
        assert_eq!(got_a.1, Some(Msg::Pong(Pong { seq })));
    }
}
