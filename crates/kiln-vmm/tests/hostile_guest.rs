//! The guest is hostile: a peer that speaks garbage, oversized frames or the wrong messages
//! must only end its own session, with the reason reported, never crash or hang the host.
//! The peer here plays a compromised guest agent over a real socket pair.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kiln_proto::handshake::{self, HelloAck};
use kiln_proto::{FramedStream, GuestFrame, Request, Session, SessionEnd};
use kiln_vmm::agent::{AgentClient, AgentError};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

fn ack(nonce: u64, generation: u16) -> HelloAck {
    HelloAck {
        nonce,
        generation,
        agent_version: "evil".into(),
        sessions: 1,
    }
}

/// A hostile agent that completes the handshake, then runs `behave` on every stream.
async fn hostile_agent<F, Fut>(behave: F) -> AgentClient
where
    F: Fn(FramedStream<kiln_proto::Stream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (host, guest) = UnixStream::pair().unwrap();
    tokio::spawn(async move {
        let (_, generation, io) = handshake::server(guest, ack).await.unwrap();
        let (session, mut streams) = Session::server(io, generation);
        let behave = std::sync::Arc::new(behave);
        while let Some(stream) = streams.recv().await {
            let behave = behave.clone();
            tokio::spawn(async move {
                let mut framed = FramedStream::new(stream);
                let _: Option<Request> = framed.recv().await.unwrap_or(None);
                behave(framed).await;
            });
        }
        drop(session);
    });
    AgentClient::handshake(host, Duration::from_secs(5))
        .await
        .unwrap()
}

async fn assert_aborted(client: &AgentClient) {
    let end = tokio::time::timeout(Duration::from_secs(5), client.wait_end())
        .await
        .expect("session ends");
    match end {
        SessionEnd::Aborted(why) => assert!(why.contains("protocol violation"), "{why}"),
        other => panic!("expected an aborted session, got {other:?}"),
    }
    assert!(
        matches!(client.ping().await, Err(AgentError::Session(_))),
        "session is unusable afterwards"
    );
}

#[tokio::test]
async fn a_silent_or_babbling_peer_fails_the_handshake_in_bounded_time() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let babble = tokio::spawn(async move {
        let junk = vec![0x5a; 64 * 1024];
        while guest.write_all(&junk).await.is_ok() {}
    });
    let err = AgentClient::handshake(host, Duration::from_secs(20))
        .await
        .err()
        .expect("handshake must fail");
    assert!(matches!(err, AgentError::Handshake(_)), "{err}");
    babble.abort();

    let (host, _guest) = UnixStream::pair().unwrap();
    let err = AgentClient::handshake(host, Duration::from_millis(300))
        .await
        .err()
        .expect("silence times out");
    assert!(matches!(err, AgentError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn garbage_after_the_handshake_ends_the_session_with_a_reason() {
    let (host, guest) = UnixStream::pair().unwrap();
    tokio::spawn(async move {
        let (_, _, mut io) = handshake::server(guest, ack).await.unwrap();
        io.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let client = AgentClient::handshake(host, Duration::from_secs(5))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), client.wait_end())
        .await
        .expect("session ends");
    assert!(matches!(end, SessionEnd::Failed(_)), "{end:?}");
    assert!(client.ping().await.is_err());
}

#[tokio::test]
async fn an_oversized_frame_aborts_the_session() {
    let client = hostile_agent(|framed| async move {
        let mut raw = framed.into_raw();
        let _ = raw.write_all(&(64u32 << 20).to_be_bytes()).await;
        let _ = raw.write_all(&[0u8; 1024]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let err = client.ping().await.unwrap_err();
    assert!(
        matches!(err, AgentError::Protocol(ref why) if why.contains("limit")),
        "{err}"
    );
    assert_aborted(&client).await;
}

#[tokio::test]
async fn the_wrong_message_aborts_the_session() {
    let client = hostile_agent(|mut framed| async move {
        let _ = framed.send(&GuestFrame::Connected).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let err = client.sh("true").await.unwrap_err();
    assert!(
        matches!(err, AgentError::Protocol(ref why) if why.contains("Connected")),
        "{err}"
    );
    assert_aborted(&client).await;
}

#[tokio::test]
async fn a_file_larger_than_announced_or_asked_is_refused() {
    let client = hostile_agent(|mut framed| async move {
        let _ = framed
            .send(&GuestFrame::FileMeta {
                size: 1 << 40,
                mode: 0o644,
            })
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let err = client.get_file("/etc/passwd", 1024).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Protocol(ref why) if why.contains("1024")),
        "{err}"
    );
    assert_aborted(&client).await;
}

#[tokio::test]
async fn an_undecodable_frame_aborts_the_session() {
    let client = hostile_agent(|framed| async move {
        let mut raw = framed.into_raw();
        let _ = raw.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, AgentError::Protocol(_)), "{err}");
    assert_aborted(&client).await;
}

#[tokio::test]
async fn a_guest_that_never_answers_costs_a_bounded_wait_not_a_task_forever() {
    // Takes every request and says nothing, holding the stream open.
    let client = hostile_agent(|framed| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(framed);
    })
    .await;
    let started = std::time::Instant::now();
    let exec = kiln_proto::ExecRequest {
        timeout_ms: Some(200),
        ..kiln_proto::ExecRequest::shell("sleep 1")
    };
    let (exec, logs, port) = tokio::join!(
        client.exec(exec, None, 1024),
        client.app_logs(1024),
        client.connect_port(8080),
    );
    assert!(matches!(exec, Err(AgentError::Timeout(_))), "{exec:?}");
    assert!(matches!(logs, Err(AgentError::Timeout(_))), "{logs:?}");
    assert!(
        matches!(port, Err(AgentError::Timeout(_))),
        "{:?}",
        port.err()
    );
    let waited = started.elapsed();
    assert!(
        waited <= kiln_vmm::agent::REPLY_TIMEOUT + Duration::from_secs(3),
        "{waited:?}"
    );
    // Waiting gave up on the requests, not the session.
    assert!(client.ended().is_none(), "{:?}", client.ended());
}
