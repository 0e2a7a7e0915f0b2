//! A hostile HTTP/2 client written frame by frame (what a well-behaved client library will not
//! do): requests whose responses are never read (the socket is never read either), rapid
//! HEADERS + RST_STREAM pairs, and request bodies that never come. Header blocks are HPACK
//! literals without Huffman coding (RFC 7541 6.2.2), which every decoder accepts.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame: type, flags, stream and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn literal(name_index: u8, value: &str) -> Vec<u8> {
    // Literal header field without indexing, indexed name (4-bit prefix), value not Huffman coded.
    assert!(name_index < 15 && value.len() < 127);
    let mut b = vec![name_index, value.len() as u8];
    b.extend_from_slice(value.as_bytes());
    b
}

/// A HEADERS frame for `method path` at `authority` on `stream`; `end` ends the stream (no body).
pub fn headers(stream: u32, method: &str, path: &str, authority: &str, end: bool) -> Vec<u8> {
    let mut block = match method {
        "GET" => vec![0x82],  // :method GET (static index 2)
        "POST" => vec![0x83], // :method POST (static index 3)
        m => literal(2, m),
    };
    block.push(0x86); // :scheme http (static index 6)
    block.extend(literal(4, path)); // :path
    block.extend(literal(1, authority)); // :authority
    let flags = 0x4 | if end { 0x1 } else { 0 }; // END_HEADERS (| END_STREAM)
    frame(1, flags, stream, &block)
}

/// RST_STREAM(CANCEL) for `stream`.
pub fn reset(stream: u32) -> Vec<u8> {
    frame(3, 0, stream, &8u32.to_be_bytes())
}

/// The client preface and SETTINGS with an initial stream window of `window` bytes, a SETTINGS
/// ACK (for the server's, unread), and a connection WINDOW_UPDATE raising the connection window to
/// `window` too: the client asks for everything at once.
pub fn hello(window: u32) -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    let mut settings = Vec::new();
    settings.extend_from_slice(&4u16.to_be_bytes()); // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend_from_slice(&window.to_be_bytes());
    b.extend(frame(4, 0, 0, &settings));
    b.extend(frame(4, 1, 0, &[]));
    if window > 65_535 {
        b.extend(frame(8, 0, 0, &(window - 65_535).to_be_bytes()));
    }
    b
}

/// A connection that has said hello and sends `frames`, and is then never read.
pub async fn send(to: SocketAddr, from: Option<&str>, window: u32, frames: &[Vec<u8>]) -> std::io::Result<TcpStream> {
    let mut s = match from {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(format!("{ip}:0").parse().expect("source address"))?;
            sock.connect(to).await?
        }
        None => TcpStream::connect(to).await?,
    };
    let mut out = hello(window);
    for f in frames {
        out.extend_from_slice(f);
    }
    s.write_all(&out).await?;
    Ok(s)
}
