//! A response sent before its request's body was read to the end says `Connection: close`
//! (HTTP/1). hyper does not keep such a connection open, and a client that pooled it
//! because nothing said otherwise sends its next request into a closed socket (an
//! "unexpected EOF" that depends on how the body's bytes happened to arrive). Refusals
//! before the body is read are common: no key, a full disk, a limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::Response;

/// A request body that records whether it was read to its end.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.ended.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Adds `Connection: close` to the response of an HTTP/1 request whose body the handler
/// left unread.
pub async fn close_if_unread(req: Request, next: Next) -> Response {
    if req.body().is_end_stream() || req.version() >= Version::HTTP_2 {
        return next.run(req).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let tracked = ended.clone();
    let req = req.map(|inner| {
        Body::new(Tracked {
            inner,
            ended: tracked,
        })
    });
    let mut response = next.run(req).await;
    if !ended.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
