//! One HTTP/1.1 request to a port on the guest's loopback (lifecycle hooks use this).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use kiln_proto::{ErrorKind, GuestError, HttpRequest, HttpResponse};
use serde_bytes::ByteBuf;

pub async fn call(req: HttpRequest) -> Result<HttpResponse, GuestError> {
    let timeout = Duration::from_millis(req.timeout_ms);
    match tokio::time::timeout(timeout, call_inner(req)).await {
        Ok(result) => result,
        Err(_) => Err(GuestError::new(
            ErrorKind::Timeout,
            format!("no answer within {} ms", timeout.as_millis()),
        )),
    }
}

async fn call_inner(req: HttpRequest) -> Result<HttpResponse, GuestError> {
    if !req.path.starts_with('/') {
        return Err(GuestError::new(
            ErrorKind::InvalidRequest,
            format!("path {:?} must start with /", req.path),
        ));
    }
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", req.port))
        .await
        .map_err(|e| {
            GuestError::new(
                ErrorKind::Io,
                format!("connect to 127.0.0.1:{}: {e}", req.port),
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| GuestError::new(ErrorKind::Io, format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = hyper::Request::builder()
        .method(req.method.as_str())
        .uri(req.path.as_str())
        .header("host", format!("127.0.0.1:{}", req.port));
    for (k, v) in &req.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body.into_vec())))
        .map_err(|e| GuestError::new(ErrorKind::InvalidRequest, format!("bad request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| GuestError::new(ErrorKind::Io, format!("HTTP request: {e}")))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let limit = req.max_response_bytes as usize;
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            GuestError::new(
                ErrorKind::TooLarge,
                format!("response body: {e} (limit {limit} bytes)"),
            )
        })?
        .to_bytes();
    Ok(HttpResponse {
        status,
        headers,
        body: ByteBuf::from(body.to_vec()),
    })
}
