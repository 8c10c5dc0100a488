//! Does the app behind a guest port speak HTTP/2? A client speaks HTTP/2 to the ingress when it
//! negotiated it (ALPN `h2` over TLS: browsers, curl, …) or chose it (h2c, gRPC), which says
//! nothing about the app, and most apps (Flask, busybox httpd, …) speak only HTTP/1.1. Before
//! the first HTTP/2 request (other than gRPC, which is HTTP/2 by definition) to a microVM's
//! port, the proxy sends the HTTP/2 connection preface on a separate guest stream: a SETTINGS
//! frame back means HTTP/2, anything else (an HTTP/1.1 error, a close, silence) HTTP/1.1. The
//! answer is remembered per microVM and port.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::GuestStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
const FRAME_TYPE_SETTINGS: u8 = 4;
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Remembered answers; the map is cleared when it grows past this (microVMs come and go).
const MAX_REMEMBERED: usize = 4096;

/// What each microVM port was found to speak.
#[derive(Default)]
pub struct Http2Apps(Mutex<HashMap<(String, u16), bool>>);

impl Http2Apps {
    pub fn known(&self, microvm: &str, port: u16) -> Option<bool> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(microvm.to_string(), port))
            .copied()
    }

    pub fn learn(&self, microvm: &str, port: u16, http2: bool) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_REMEMBERED {
            map.clear();
        }
        map.insert((microvm.to_string(), port), http2);
    }
}

/// Whether the server on `stream` answers the HTTP/2 preface with its SETTINGS frame.
pub async fn probe(mut stream: Box<dyn GuestStream>) -> bool {
    let exchange = async {
        stream.write_all(PREFACE).await?;
        stream.write_all(&EMPTY_SETTINGS).await?;
        stream.flush().await?;
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Ok(Ok(head)) => head[3] == FRAME_TYPE_SETTINGS,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_settings_frame_means_http2_anything_else_does_not() {
        for (answer, expected) in [
            (&[0u8, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100][..], true),
            (&b"HTTP/1.1 400 Bad Request\r\n\r\n"[..], false),
            (&b""[..], false),
        ] {
            let (ours, mut theirs) = tokio::io::duplex(1024);
            let server = async move {
                let mut seen = vec![0u8; PREFACE.len() + 9];
                theirs.read_exact(&mut seen).await.unwrap();
                assert!(seen.starts_with(PREFACE));
                theirs.write_all(answer).await.unwrap();
            };
            let (http2, ()) = tokio::join!(probe(Box::new(ours)), server);
            assert_eq!(http2, expected, "{answer:?}");
        }
        let apps = Http2Apps::default();
        assert_eq!(apps.known("mvm-1", 8080), None);
        apps.learn("mvm-1", 8080, false);
        assert_eq!(apps.known("mvm-1", 8080), Some(false));
        assert_eq!(apps.known("mvm-1", 8081), None);
    }
}
