//! Body frames as the public endpoint forwards them: [`Chunks`] hands on the data frames a peer
//! sent, joining the small ones already received into one (up to a bound) and keeping trailers
//! and errors in order. An HTTP/2 peer's frame boundaries mean nothing (a gRPC stream of 10,000
//! small messages arrives as 10,000 small DATA frames), but each frame the relay holds costs
//! memory beyond its bytes, which h2 bounds by closing a connection that keeps too many of them
//! buffered (`ENHANCE_YOUR_CALM`, "too_many_data_frames"). Draining whatever is ready at each
//! poll keeps what the relay holds down to its bytes, and the next hop gets fewer, larger frames.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming};

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
