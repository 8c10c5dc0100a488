//! kiln-testapp: runs inside test guests. Port 9000 answers lifecycle hooks; port 8080
//! serves `/proto` (the HTTP version seen), `/ws` (WebSocket echo), `/grpc.Echo/Say` and
//! `/grpc.Echo/Stream` (gRPC-style framing with `grpc-status` trailers), `/headers` (the
//! request target, `X-Forwarded-Prefix` and `Host` it got) and `/reset` (drops the connection
//! without answering).

// A binary's output is its interface.
#![allow(clippy::print_stdout)]

use std::convert::Infallible;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    tokio::spawn(async {
        if let Err(e) = serve(9000, true).await {
            eprintln!("kiln-testapp: cannot listen on port 9000: {e}");
        }
    });
    serve(8080, false).await
}

async fn serve(port: u16, hooks: bool) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(if hooks {
                    Response::new(full("ok"))
                } else {
                    app(req).await
                })
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn app(mut req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/proto" => Response::new(full(format!("{:?}", req.version()))),
        "/headers" => {
            let get = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let target = req.uri().path_and_query().map_or("", |p| p.as_str());
            Response::new(full(format!(
                "target={target}\nprefix={}\nhost={}\n",
                get("x-forwarded-prefix"),
                get("host")
            )))
        }
        "/reset" => std::process::abort(),
        "/ws" => {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let accept = base64::engine::general_purpose::STANDARD.encode(Sha1::digest(
                format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
            ));
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let _ = echo_websocket(TokioIo::new(upgraded)).await;
                }
            });
            // INVARIANT: the status and names are constants and every value is visible
            // ASCII (the accept value is base64), so the builder holds no error.
            #[allow(clippy::expect_used)]
            let resp = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .expect("response");
            resp
        }
        "/grpc.Echo/Say" | "/grpc.Echo/Stream" => {
            let repeat = if req.uri().path().ends_with("Stream") {
                3
            } else {
                1
            };
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..repeat)
                .map(|_| Ok(Frame::data(body.clone())))
                .chain(std::iter::once(Ok(Frame::trailers({
                    let mut t = hyper::HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    t
                }))))
                .collect();
            let mut resp = Response::new(futures_iter(frames).boxed());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            resp
        }
        _ => {
            let mut resp = Response::new(full("not found"));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

fn futures_iter<T>(items: Vec<T>) -> impl hyper::body::Body<Data = Bytes, Error = Infallible>
where
    T: Into<Result<Frame<Bytes>, Infallible>>,
{
    struct Frames(std::collections::VecDeque<Result<Frame<Bytes>, Infallible>>);
    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(self.0.pop_front())
        }
    }
    Frames(items.into_iter().map(Into::into).collect())
}

/// Echoes WebSocket text/binary frames (client frames are masked; ours are not).
async fn echo_websocket<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let mut len = (head[1] & 0x7f) as u64;
        if len == 126 {
            len = s.read_u16().await? as u64;
        } else if len == 127 {
            len = s.read_u64().await?;
        }
        if len > 1 << 20 {
            return Ok(());
        }
        let mut mask = [0u8; 4];
        if masked {
            s.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        if opcode == 8 {
            return Ok(());
        }
        let mut frame = vec![0x80 | opcode];
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&payload);
        s.write_all(&frame).await?;
    }
}
