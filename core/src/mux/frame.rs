//! The `libtunnel.v1` frame codec and the `GoAway` notice codec: pure encode/decode, no state.
//!
//! A mux frame is one WebSocket binary message (or one `u32`-length-prefixed record on the raw-TCP
//! transport): `kind: u8 | stream_id: u32 BE | payload`. A `GoAway` payload is empty (a plain
//! drain) or `code: u32 BE | reason UTF-8` (why the sender is closing).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, ErrorCode, Result};

/// The longest reason a `GoAway` notice carries (bytes).
pub const MAX_NOTICE: usize = 512;

/// Kinds of mux frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Open a stream (odd ids from the session's client side, even from the relay side).
    Open = 1,
    /// Stream bytes; consumes the receiver's window.
    Data = 2,
    /// Grant `u32` more bytes of window.
    Window = 3,
    /// The sender will write no more (half-close).
    Fin = 4,
    /// Abort the stream; payload is an optional `u32` error code.
    Rst = 5,
    /// Keepalive probe (stream 0, 8-byte payload echoed in `Pong`).
    Ping = 6,
    /// Keepalive answer.
    Pong = 7,
    /// The sender accepts no new streams (graceful shutdown); existing ones continue.
    GoAway = 8,
}

impl FrameKind {
    /// The kind of an encoded frame.
    pub fn of(frame: &[u8]) -> Option<FrameKind> {
        frame.first().copied().and_then(FrameKind::from_u8)
    }

    fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Open,
            2 => FrameKind::Data,
            3 => FrameKind::Window,
            4 => FrameKind::Fin,
            5 => FrameKind::Rst,
            6 => FrameKind::Ping,
            7 => FrameKind::Pong,
            8 => FrameKind::GoAway,
            _ => return None,
        })
    }
}

/// Bytes in a frame header.
pub const FRAME_HEADER: usize = 5;

/// A decoded mux frame; `payload` shares the received buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame does.
    pub kind: FrameKind,
    /// Stream it belongs to (0 for session-level frames).
    pub stream: u32,
    /// Frame body.
    pub payload: Bytes,
}

impl Frame {
    /// Decode one frame; errors on an unknown kind or a short header.
    pub fn decode(mut b: Bytes) -> Result<Frame> {
        if b.len() < FRAME_HEADER {
            return Err(Error::protocol(format!("mux frame of {} bytes is shorter than its header", b.len())));
        }
        let kind = FrameKind::from_u8(b[0]).ok_or_else(|| Error::protocol(format!("unknown mux frame kind {}", b[0])))?;
        let stream = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        b.advance(FRAME_HEADER);
        Ok(Frame { kind, stream, payload: b })
    }

    /// Encode a frame with a small payload.
    pub fn encode(kind: FrameKind, stream: u32, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(FRAME_HEADER + payload.len());
        b.put_u8(kind as u8);
        b.put_u32(stream);
        b.put_slice(payload);
        b.freeze()
    }

    /// `Window` frame granting `n` bytes.
    pub fn window(stream: u32, n: u32) -> Bytes {
        Frame::encode(FrameKind::Window, stream, &n.to_be_bytes())
    }

    /// `Rst` frame carrying an error code.
    pub fn rst(stream: u32, code: ErrorCode) -> Bytes {
        Frame::encode(FrameKind::Rst, stream, &code.number().to_be_bytes())
    }

    /// Read the `u32` in a `Window`/`Rst` payload.
    pub fn payload_u32(&self) -> Option<u32> {
        (self.payload.len() == 4).then(|| u32::from_be_bytes(self.payload[..4].try_into().expect("len 4")))
    }
}

/// Encode a `GoAway` notice: `code`, then at most [`MAX_NOTICE`] bytes of `why`.
pub fn encode_notice(code: ErrorCode, why: &str) -> Bytes {
    let cut = why.len().min(MAX_NOTICE);
    let mut payload = code.number().to_be_bytes().to_vec();
    payload.extend_from_slice(&why.as_bytes()[..cut]);
    Frame::encode(FrameKind::GoAway, 0, &payload)
}

/// Decode a `GoAway` payload: `[code u32 BE][reason UTF-8]`, or `None` for a plain drain.
pub fn decode_notice(payload: &[u8]) -> Option<(ErrorCode, String)> {
    let n = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let code = ErrorCode::from_number(n)?;
    let why = String::from_utf8_lossy(&payload[4..payload.len().min(4 + MAX_NOTICE)]).into_owned();
    Some((code, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_garbage() {
        let f = Frame::decode(Frame::encode(FrameKind::Data, 7, b"hi")).unwrap();
        assert_eq!((f.kind, f.stream, &f.payload[..]), (FrameKind::Data, 7, &b"hi"[..]));
        assert_eq!(Frame::decode(Frame::window(3, 99)).unwrap().payload_u32(), Some(99));
        assert!(Frame::decode(Bytes::from_static(b"\x01\x00")).is_err());
        assert!(Frame::decode(Bytes::from_static(b"\x63\x00\x00\x00\x01")).is_err());
    }

    #[test]
    fn notices_round_trip_and_are_bounded() {
        let f = Frame::decode(encode_notice(ErrorCode::NameTaken, "taken")).unwrap();
        assert_eq!(f.kind, FrameKind::GoAway);
        assert_eq!(decode_notice(&f.payload), Some((ErrorCode::NameTaken, "taken".to_string())));
        assert_eq!(decode_notice(&[]), None);
        let long = "é".repeat(MAX_NOTICE);
        let f = Frame::decode(encode_notice(ErrorCode::Closed, &long)).unwrap();
        assert!(f.payload.len() <= 4 + MAX_NOTICE);
        assert!(decode_notice(&f.payload).unwrap().1.starts_with("éé"));
    }
}
