//! Connections that do not start with a valid Hello, or that send what
//! their role may not, are refused with a message and closed.

use surveil_proto::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;

fn rejected(result: Result<impl std::fmt::Debug, HandshakeError>) -> (RejectCode, String) {
    match result {
        Err(HandshakeError::Rejected { code, message, .. }) => (code, message),
        other => panic!("expected a Reject, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_handshakes_get_a_reject_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.token = Some("s3cret".into());
    let d = Dispatcher::start(config).await;

    let mut hello = Hello::new(Role::Client, "c");
    hello.token = "wrong".into();
    let (code, message) = rejected(handshake(d.addr, hello).await.map(|_| ()));
    assert_eq!(code, RejectCode::BadToken);
    assert!(message.contains("token"), "{message}");

    let mut hello = Hello::new(Role::Client, "c");
    hello.token = "s3cret".into();
    hello.protocol_version = 9;
    let (code, message) = rejected(handshake(d.addr, hello).await.map(|_| ()));
    assert_eq!(code, RejectCode::UnsupportedVersion);
    assert!(message.contains('9'), "{message}");

    let mut hello = Hello::new(Role::Runner, "r");
    hello.token = "s3cret".into();
    hello.slots = 0;
    let (code, message) = rejected(handshake(d.addr, hello).await.map(|_| ()));
    assert_eq!(code, RejectCode::BadRole);
    assert!(message.contains("slots"), "{message}");

    let mut hello = Hello::new(Role::Unspecified, "r");
    hello.token = "s3cret".into();
    let (code, _) = rejected(handshake(d.addr, hello).await.map(|_| ()));
    assert_eq!(code, RejectCode::BadRole);

    // Garbage: a frame whose body is not a protobuf Envelope.
    let mut stream = TcpStream::connect(d.addr).await.unwrap();
    stream
        .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut conn = Connection::new(stream);
    match tokio::time::timeout(WAIT, conn.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Some(Msg::Reject(r)) => assert_eq!(r.code(), RejectCode::ProtocolError),
        other => panic!("expected Reject, got {other:?}"),
    }

    // Silence: nothing within the handshake timeout.
    let stream = TcpStream::connect(d.addr).await.unwrap();
    let mut conn = Connection::new(stream);
    match tokio::time::timeout(WAIT, conn.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Some(Msg::Reject(r)) => assert_eq!(r.code(), RejectCode::HandshakeTimeout),
        other => panic!("expected Reject, got {other:?}"),
    }

    // An oversized length prefix.
    let mut stream = TcpStream::connect(d.addr).await.unwrap();
    stream.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let mut conn = Connection::new(stream);
    match tokio::time::timeout(WAIT, conn.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Some(Msg::Reject(r)) => assert_eq!(r.code(), RejectCode::FrameTooLarge),
        other => panic!("expected Reject, got {other:?}"),
    }

    // The right token gets in.
    let mut hello = Hello::new(Role::Client, "c");
    hello.token = "s3cret".into();
    let (_, welcome) = handshake(d.addr, hello).await.unwrap();
    assert_eq!(welcome.runner_timeout_ms, 1000);
    d.stop().await;
}

#[tokio::test]
async fn a_message_the_role_may_not_send_gets_an_error_and_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;

    let mut observer = Client::connect(d.addr, Hello::new(Role::Observer, "obs")).await;
    match observer.call(ListJobs::default()).await {
        Msg::Error(e) => assert!(
            e.message.contains("observer may not send ListJobs"),
            "{}",
            e.message
        ),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(observer.recv().await, None);

    let mut runner = d.runner("ci-1", 1).await;
    runner
        .send(Submit {
            repo: REPO.into(),
            branch: "main".into(),
            commits: vec![commit(1)],
            ..Submit::default()
        })
        .await;
    match runner.recv().await {
        Some(Msg::Error(e)) => assert!(
            e.message.contains("runner may not send Submit"),
            "{}",
            e.message
        ),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(runner.recv().await, None);

    let mut client = d.client().await;
    match client.call(Hello::new(Role::Client, "again")).await {
        Msg::Error(e) => assert!(e.message.contains("second Hello"), "{}", e.message),
        other => panic!("expected Error, got {other:?}"),
    }

    // Nothing was submitted by the runner.
    let mut client = d.client().await;
    match client.call(ListJobs::default()).await {
        Msg::ListJobsReply(r) => assert!(r.jobs.is_empty()),
        other => panic!("expected ListJobsReply, got {other:?}"),
    }
    d.stop().await;
}

#[tokio::test]
async fn an_undecodable_or_future_frame_after_the_handshake_gets_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;

    // Field 99, length-delimited and empty: a oneof arm this version lacks.
    let mut client = d.client().await;
    client
        .conn
        .get_mut()
        .write_all(&[0, 0, 0, 3, 0x9A, 0x06, 0x00])
        .await
        .unwrap();
    match client.recv().await {
        Some(Msg::Error(e)) => assert!(e.message.contains("newer version"), "{}", e.message),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(client.recv().await, None);

    // Bytes that are no protobuf at all.
    let mut client = d.client().await;
    client
        .conn
        .get_mut()
        .write_all(&[0, 0, 0, 2, 0xFF, 0xFF])
        .await
        .unwrap();
    match client.recv().await {
        Some(Msg::Error(e)) => assert!(e.message.contains("not a valid"), "{}", e.message),
        other => panic!("expected Error, got {other:?}"),
    }

    // The dispatcher still serves everyone else.
    let mut client = d.client().await;
    assert!(matches!(
        client.call(GetStatus::default()).await,
        Msg::GetStatusReply(_)
    ));
    d.stop().await;
}
