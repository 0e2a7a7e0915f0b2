//! Body frames as the public endpoint forwards them: [`Chunks`] hands on the data frames a peer
//! sent, joining the small ones already received into one (up to a bound) and keeping trailers
//! and errors in order. An HTTP/2 peer's frame boundaries mean nothing (a gRPC stream of 10,000
//! small messages arrives as 10,000 small DATA frames), but each frame the relay holds costs
//! memory beyond its bytes, which h2 bounds by closing a connection that keeps too many of them
//! buffered (`ENHANCE_YOUR_CALM`, "too_many_data_frames"). Draining whatever is ready at each
//! poll keeps what the relay holds down to its bytes, and the next hop gets fewer, larger frames.
//! [`Pieces`] is a client's request body on its way to a listener, cut into bounded pieces.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming};

use crate::relay::metrics::ListenerHttp;

type Next = Option<Result<Frame<Bytes>, hyper::Error>>;

/// An [`Incoming`] body whose ready data frames come out joined, up to `max` bytes at once.
pub(crate) struct Chunks {
    inner: Incoming,
    max: usize,
    /// A trailers frame or an error that arrived after data being joined: handed out next.
    held: Option<Result<Frame<Bytes>, hyper::Error>>,
    ended: bool,
}

impl Chunks {
    pub(crate) fn new(inner: Incoming, max: usize) -> Chunks {
        Chunks { inner, max, held: None, ended: false }
    }

    /// The next frame: data (joined), trailers, an error, or the end.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        if let Some(h) = self.held.take() {
            return Poll::Ready(Some(h));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let first = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(other) => return Poll::Ready(Some(Ok(other))),
            },
            None => {
                self.ended = true;
                return Poll::Ready(None);
            }
            err => return Poll::Ready(err),
        };
        if first.len() * 2 >= self.max {
            return Poll::Ready(Some(Ok(Frame::data(first)))); // large already: as it came
        }
        let mut joined: Option<BytesMut> = None;
        loop {
            let len = joined.as_ref().map_or(first.len(), |j| j.len());
            if len >= self.max {
                break;
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    self.ended = true;
                    break;
                }
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => joined.get_or_insert_with(|| BytesMut::from(&first[..])).extend_from_slice(&d),
                    Err(other) => {
                        self.held = Some(Ok(other));
                        break;
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    self.held = Some(Err(e));
                    break;
                }
            }
        }
        Poll::Ready(Some(Ok(Frame::data(joined.map_or(first, BytesMut::freeze)))))
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.held.is_none() && (self.ended || self.inner.is_end_stream())
    }

    pub(crate) fn size_hint(&self) -> hyper::body::SizeHint {
        if self.held.is_some() || self.ended {
            return hyper::body::SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// Largest piece of a request body handed to the listener connection at once. hyper's client
/// copies each piece into its write buffer whole (the mux stream takes no vectored writes), and
/// the pieces came as large as the public connection's read buffer (64 KiB): bounding them
/// bounds that buffer to the endpoint's `UPSTREAM_BUFFER` plus one piece.
const PIECE: usize = 16 * 1024;

/// A client's request body cut into pieces of at most [`PIECE`] bytes (slices of the same
/// buffers: nothing is copied), small frames joined (see [`Chunks`]).
pub(crate) struct Pieces {
    inner: Chunks,
    rest: Bytes,
    stats: Option<Arc<ListenerHttp>>,
}

impl Pieces {
    /// A client's request body, counted in the listener's `bytes_in` when `stats` is given.
    pub(crate) fn new(body: Incoming, stats: Option<Arc<ListenerHttp>>) -> Pieces {
        Pieces { inner: Chunks::new(body, PIECE), rest: Bytes::new(), stats }
    }
}

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.rest.is_empty() {
            match std::task::ready!(this.inner.poll_next(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(s) = &this.stats {
                            s.bytes_in.fetch_add(data.len() as u64, Relaxed);
                        }
                        this.rest = data
                    }
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return Poll::Ready(other),
            }
        }
        let n = this.rest.len().min(PIECE);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(this.rest.split_to(n)))))
    }
    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut h = hyper::body::SizeHint::new();
        h.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            h.set_upper(upper + rest);
        }
        h
    }
}
