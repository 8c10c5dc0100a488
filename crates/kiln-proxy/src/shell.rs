//! Shell ingress: a `shell` token opens an interactive terminal in the microVM over a
//! WebSocket at `/.kiln/shell?cols=N&rows=M`. Binary frames carry terminal bytes both ways;
//! text frames are JSON control messages: `{"type":"resize","cols":..,"rows":..}` from the
//! client, `{"type":"exit","code":..}` from the server before it closes.

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

pub const SHELL_PATH: &str = "/.kiln/shell";
/// Largest WebSocket frame accepted from a client.
const MAX_FRAME: u64 = 1 << 20;

pub enum ShellInput {
    Data(Vec<u8>),
    Resize { cols: u16, rows: u16 },
}

pub enum ShellOutput {
    Data(Vec<u8>),
    Exit(Option<i32>),
}

/// The two ends of a terminal session in a microVM.
pub struct ShellChannels {
    pub input: mpsc::Sender<ShellInput>,
    pub output: mpsc::Receiver<ShellOutput>,
}

fn size_from_query(req: &Request<Incoming>) -> (u16, u16) {
    let (mut cols, mut rows) = (80, 24);
    for pair in req.uri().query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("cols", v)) => cols = v.parse().unwrap_or(cols),
            Some(("rows", v)) => rows = v.parse().unwrap_or(rows),
            _ => {}
        }
    }
    (cols.clamp(1, 1000), rows.clamp(1, 1000))
}

/// Answers the WebSocket handshake and bridges frames to the session `open` starts.
pub async fn accept<F, Fut>(
    mut req: Request<Incoming>,
    open: F,
    guard: Box<dyn Send + Sync>,
) -> Response<Full<Bytes>>
where
    F: FnOnce(u16, u16) -> Fut,
    Fut: std::future::Future<Output = Result<ShellChannels, (StatusCode, String)>>,
{
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return plain(
            StatusCode::BAD_REQUEST,
            "the shell needs a WebSocket upgrade",
        );
    };
    let (cols, rows) = size_from_query(&req);
    let channels = match open(cols, rows).await {
        Ok(c) => c,
        Err((status, why)) => return plain(status, &why),
    };
    let accept = base64::engine::general_purpose::STANDARD.encode(Sha1::digest(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    let offered = crate::server::websocket_protocols(&req)
        .into_iter()
        .find(|p| !p.starts_with(crate::server::WS_AUTH_PREFIX));
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _guard = guard;
        if let Ok(upgraded) = upgrade.await {
            bridge(TokioIo::new(upgraded), channels).await;
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept);
    if let Some(p) = offered {
        resp = resp.header("sec-websocket-protocol", p);
    }
    // INVARIANT: the names are constants and every value is visible ASCII (base64, and a
    // protocol split from the request's own visible-ASCII header), so the builder holds no
    // error.
    #[allow(clippy::expect_used)]
    let resp = resp.body(Full::new(Bytes::new())).expect("valid response");
    resp
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"code": "ShellUnavailable", "message": message}).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n < 65536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    w.write_all(&frame).await
}

/// Reads one client frame: (opcode, unmasked payload). Client frames must be masked.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    if head[1] & 0x80 == 0 {
        return Err(bad("unmasked client frame"));
    }
    let mut len = (head[1] & 0x7f) as u64;
    if len == 126 {
        len = r.read_u16().await? as u64;
    } else if len == 127 {
        len = r.read_u64().await?;
    }
    if len > MAX_FRAME {
        return Err(bad("frame too large"));
    }
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask).await?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok((head[0] & 0x0f, payload))
}

async fn bridge<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    mut channels: ShellChannels,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let input = channels.input.clone();
    let reader = tokio::spawn(async move {
        while let Ok((opcode, payload)) = read_frame(&mut rd).await {
            let msg = match opcode {
                0x2 => ShellInput::Data(payload),
                0x1 => match serde_json::from_slice::<serde_json::Value>(&payload) {
                    Ok(v) if v["type"] == "resize" => ShellInput::Resize {
                        cols: v["cols"].as_u64().unwrap_or(80).clamp(1, 1000) as u16,
                        rows: v["rows"].as_u64().unwrap_or(24).clamp(1, 1000) as u16,
                    },
                    _ => ShellInput::Data(payload),
                },
                0x8 => break,
                _ => continue,
            };
            if input.send(msg).await.is_err() {
                break;
            }
        }
    });
    drop(channels.input);
    while let Some(out) = channels.output.recv().await {
        let result = match out {
            ShellOutput::Data(d) => write_frame(&mut wr, 0x2, &d).await,
            ShellOutput::Exit(code) => {
                let msg = serde_json::json!({"type": "exit", "code": code}).to_string();
                let _ = write_frame(&mut wr, 0x1, msg.as_bytes()).await;
                let _ = write_frame(&mut wr, 0x8, &1000u16.to_be_bytes()).await;
                break;
            }
        };
        if result.is_err() {
            break;
        }
    }
    reader.abort();
    let _ = wr.shutdown().await;
}
