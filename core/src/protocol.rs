//! Wire messages: Emissary's `ServerConnect` preamble, the multiplexed session hello and its
//! answer (the mux frame codec lives in `mux::frame` and is re-exported here). Pure
//! encode/decode, no I/O beyond the raw-TCP preamble reader.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::auth::NONCE_LEN;
use crate::error::{Error, ErrorCode, Result};

/// `server_software` in the preamble; Emissary's Go client rejects anything else.
pub const SERVER_SOFTWARE: &str = "emissary-server";
/// Emissary protocol version (a SOCKS5 server follows the preamble).
pub const PROTOCOL_VERSION: i32 = 1;
/// The preamble must fit the Go client's single 1024-byte read.
pub const MAX_PREAMBLE: usize = 1024;
/// WebSocket subprotocol that selects libtunnel's multiplexed mode.
pub const MUX_SUBPROTOCOL: &str = "libtunnel.v1";
/// On the raw-TCP transport a multiplexed client sends these four bytes after the preamble
/// (a classic client starts SOCKS5 with 0x05 instead).
pub const MUX_TCP_MAGIC: &[u8; 4] = b"LTM1";
/// Version byte of the multiplexed session hello.
pub const HELLO_VERSION: u8 = 1;

/// The early hello of a multiplexed WebSocket session (request header): `base64_nopad(client
/// nonce (32 bytes) ‖ Hello)`, the hello's proof signed over the client's nonce. The client's
/// session frames follow the upgrade request without waiting. A relay that takes it answers the
/// 101 with this header set to [`EARLY_TAKEN`], sends no preamble, and its first message is the
/// [`HelloAck`]; set to [`EARLY_DECLINED`], it closes after the 101 (the client reconnects and
/// signs the relay's nonce). Without the header in the 101 the relay predates it (the same).
pub const EARLY_HELLO_HEADER: &str = "libtunnel-hello";
/// [`EARLY_HELLO_HEADER`] in a 101: the relay judged the early hello; its answer comes first.
pub const EARLY_TAKEN: &str = "taken";
/// [`EARLY_HELLO_HEADER`] in a 101: the relay did not judge it (date more than
/// [`crate::auth::EARLY_MAX_SKEW`] away, or too many recent early hellos); sign its nonce instead.
pub const EARLY_DECLINED: &str = "declined";

/// Emissary's `emissaryproto.ServerConnect`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerConnect {
    /// Always `emissary-server`.
    #[prost(string, tag = "1")]
    pub server_software: String,
    /// Free text (our crate version).
    #[prost(string, tag = "2")]
    pub server_version: String,
    /// Always 1.
    #[prost(int32, tag = "3")]
    pub protocol_version: i32,
    /// Fresh random 32 bytes per connection.
    #[prost(bytes = "vec", tag = "4")]
    pub connection_nonce: Vec<u8>,
}

impl ServerConnect {
    /// The preamble for a new connection.
    pub fn new(nonce: &[u8]) -> Self {
        ServerConnect {
            server_software: SERVER_SOFTWARE.to_string(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: PROTOCOL_VERSION,
            connection_nonce: nonce.to_vec(),
        }
    }

    /// Encode to protobuf bytes.
    pub fn encode_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decode and check as Emissary's client does; returns the nonce.
    pub fn decode_checked(buf: &[u8]) -> Result<Vec<u8>> {
        if buf.len() >= MAX_PREAMBLE {
            return Err(Error::protocol("the relay's preamble is larger than 1024 bytes; is this an Emissary-compatible relay?"));
        }
        let m = ServerConnect::decode(buf).map_err(|e| {
            Error::protocol(format!(
                "the relay's preamble is not a ServerConnect message ({e}); is the URL pointing at a libtunnel or Emissary relay?"
            ))
        })?;
        if m.server_software != SERVER_SOFTWARE {
            return Err(Error::protocol(format!(
                "the relay identifies as {:?}, not {SERVER_SOFTWARE:?}; is the URL pointing at a libtunnel or Emissary relay?",
                m.server_software
            )));
        }
        if m.protocol_version != PROTOCOL_VERSION {
            return Err(Error::protocol(format!(
                "the relay speaks protocol version {}, this client speaks {PROTOCOL_VERSION}; upgrade the older side",
                m.protocol_version
            )));
        }
        if m.connection_nonce.len() != NONCE_LEN || m.connection_nonce.iter().all(|b| *b == 0) {
            return Err(Error::protocol("the relay sent an invalid nonce (must be 32 bytes, not all zero)"));
        }
        Ok(m.connection_nonce)
    }
}

/// Read a `ServerConnect` from a raw byte stream (the raw-TCP transport sends it with no length
/// prefix): read field by field until the nonce (field 4, always last) has arrived.
pub async fn read_server_connect<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(80);
    let io = |e: std::io::Error| Error::from_io(e, "reading the relay's preamble");
    loop {
        if buf.len() > MAX_PREAMBLE {
            return Err(Error::protocol("the relay's preamble is larger than 1024 bytes"));
        }
        let tag = read_varint(r, &mut buf).await.map_err(io)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                read_varint(r, &mut buf).await.map_err(io)?;
            }
            2 => {
                let len = read_varint(r, &mut buf).await.map_err(io)? as usize;
                if len > MAX_PREAMBLE {
                    return Err(Error::protocol("the relay's preamble has an oversized field"));
                }
                let start = buf.len();
                buf.resize(start + len, 0);
                r.read_exact(&mut buf[start..]).await.map_err(io)?;
            }
            _ => return Err(Error::protocol("the relay's preamble is not a ServerConnect message")),
        }
        if field == 4 {
            return ServerConnect::decode_checked(&buf);
        }
    }
}

async fn read_varint<R: AsyncRead + Unpin>(r: &mut R, out: &mut Vec<u8>) -> std::io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = r.read_u8().await?;
        out.push(b);
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "varint too long"))
}

/// The client's first message in multiplexed mode: the Emissary proof, once per session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// HTTP date signed into the proof.
    pub date: String,
    /// `base64_nopad(kid ‖ mac)`.
    pub sig: String,
}

impl Hello {
    /// `version u8 | date_len u8 | date | sig_len u8 | sig`.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(3 + self.date.len() + self.sig.len());
        b.put_u8(HELLO_VERSION);
        b.put_u8(self.date.len() as u8);
        b.put_slice(self.date.as_bytes());
        b.put_u8(self.sig.len() as u8);
        b.put_slice(self.sig.as_bytes());
        b.freeze()
    }

    /// Decode; errors name what is wrong.
    pub fn decode(mut b: &[u8]) -> Result<Hello> {
        let bad = || Error::protocol("malformed session hello");
        if b.is_empty() {
            return Err(bad());
        }
        let v = b.get_u8();
        if v != HELLO_VERSION {
            return Err(Error::protocol(format!("session hello version {v} is not supported (this relay speaks {HELLO_VERSION})")));
        }
        let field = |b: &mut &[u8]| -> Result<String> {
            if b.is_empty() {
                return Err(bad());
            }
            let n = b.get_u8() as usize;
            if b.len() < n {
                return Err(bad());
            }
            let s = std::str::from_utf8(&b[..n]).map_err(|_| bad())?.to_string();
            b.advance(n);
            Ok(s)
        };
        let date = field(&mut b)?;
        let sig = field(&mut b)?;
        if !b.is_empty() {
            return Err(bad());
        }
        Ok(Hello { date, sig })
    }
}

/// The relay's answer to [`Hello`]: `status u32 (0 = ok, else an ErrorCode number) | msg_len u16 | msg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// `None` when accepted, else the reason.
    pub refusal: Option<(ErrorCode, String)>,
}

impl HelloAck {
    /// Encode.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match &self.refusal {
            None => {
                b.put_u32(0);
                b.put_u16(0);
            }
            Some((code, msg)) => {
                let msg = &msg.as_bytes()[..msg.len().min(1024)];
                b.put_u32(code.number());
                b.put_u16(msg.len() as u16);
                b.put_slice(msg);
            }
        }
        b.freeze()
    }

    /// Decode.
    pub fn decode(mut b: &[u8]) -> Result<HelloAck> {
        if b.len() < 6 {
            return Err(Error::protocol("malformed session hello answer from the relay"));
        }
        let status = b.get_u32();
        let n = b.get_u16() as usize;
        let msg = String::from_utf8_lossy(&b[..n.min(b.len())]).into_owned();
        if status == 0 {
            return Ok(HelloAck { refusal: None });
        }
        let code = ErrorCode::from_number(status).unwrap_or(ErrorCode::General);
        Ok(HelloAck { refusal: Some((code, msg)) })
    }
}

/// First byte of a listener's registration (instead of [`HELLO_VERSION`] for a dialer session).
pub const LISTEN_HELLO_TAG: u8 = b'L';

/// A listener's registration, sent as the first frame of a multiplexed session:
/// `LISTEN_HELLO_TAG | protobuf`. The signature covers [`crate::identity::registration_message`]
/// of the relay's nonce and `name`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListenHello {
    /// Ed25519 public key (32 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub public_key: Vec<u8>,
    /// Ed25519 signature (64 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
    /// The name to register (the key-derived name, or one the relay grants this key).
    #[prost(string, tag = "3")]
    pub name: String,
    /// Ask for a public TCP port from the relay's range.
    #[prost(bool, tag = "4")]
    pub tcp_port: bool,
    /// Join the name's pool of replicas instead of replacing its holder (a relay that predates
    /// pools ignores the field; [`ListenAck::pool`] tells the listener whether it was honoured).
    #[prost(bool, tag = "5")]
    pub pool: bool,
    /// Register as an exit listener (it connects `via` streams to targets in its own network).
    #[prost(bool, tag = "6")]
    pub exit: bool,
    /// The local service behind this listener speaks HTTP/2 with prior knowledge (h2c, e.g. a
    /// gRPC server): the relay forwards public HTTP requests to it as HTTP/2.
    #[prost(bool, tag = "7")]
    pub h2c: bool,
    /// The listener terminates TLS itself: the relay's public TLS port routes connections whose
    /// ClientHello names it (SNI) to it undecrypted.
    #[prost(bool, tag = "8")]
    pub tls_passthrough: bool,
    /// A random id of this listener object, the same in every re-registration: once a newer
    /// registration of the same key has replaced it, the relay refuses it (`NAME_TAKEN`), so an
    /// old listener that missed the notice cannot take its name back. Empty from older listeners.
    #[prost(bytes = "vec", tag = "9")]
    pub instance: Vec<u8>,
}

impl ListenHello {
    /// Encode with the leading tag.
    pub fn encode_frame(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(1 + self.encoded_len());
        b.put_u8(LISTEN_HELLO_TAG);
        self.encode(&mut b).expect("BytesMut grows");
        b.freeze()
    }

    /// Decode a frame that starts with the tag.
    pub fn decode_frame(b: &[u8]) -> Result<ListenHello> {
        let bad = || Error::protocol("malformed listener registration");
        if b.first() != Some(&LISTEN_HELLO_TAG) {
            return Err(bad());
        }
        let h = ListenHello::decode(&b[1..]).map_err(|_| bad())?;
        if h.public_key.len() != 32 || h.signature.len() != 64 || h.name.len() > 63 || h.instance.len() > 32 {
            return Err(bad());
        }
        Ok(h)
    }
}

/// The relay's answer to [`ListenHello`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListenAck {
    /// 0 when registered, else an [`ErrorCode`] number.
    #[prost(uint32, tag = "1")]
    pub status: u32,
    /// Why it was refused (names the fix).
    #[prost(string, tag = "2")]
    pub message: String,
    /// The registered name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// The public HTTP URL routed to this listener, if the relay has an HTTP port.
    #[prost(string, tag = "4")]
    pub http_url: String,
    /// The public TCP address assigned, if asked for and available.
    #[prost(string, tag = "5")]
    pub tcp_addr: String,
    /// The registration joined a pool (absent from relays that predate pools).
    #[prost(bool, tag = "6")]
    pub pool: bool,
    /// The registration is an exit listener (absent from relays that predate exits).
    #[prost(bool, tag = "7")]
    pub exit: bool,
    /// The public HTTPS URL routed to this listener, if the relay has an HTTPS port (absent from
    /// older relays).
    #[prost(string, tag = "8")]
    pub https_url: String,
}

impl ListenAck {
    /// A refusal.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> ListenAck {
        ListenAck { status: code.number(), message: message.into(), ..Default::default() }
    }

    /// Encode.
    pub fn encode_frame(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    /// Decode; a refusal becomes the typed error.
    pub fn decode_frame(b: &[u8]) -> Result<ListenAck> {
        let ack = ListenAck::decode(b).map_err(|_| Error::protocol("malformed registration answer from the relay"))?;
        if ack.status != 0 {
            let code = ErrorCode::from_number(ack.status).unwrap_or(ErrorCode::General);
            return Err(Error::new(code, ack.message));
        }
        Ok(ack)
    }
}

/// How a stream reached a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Via {
    /// A dialer CONNECTed to the listener's name.
    Dial = 1,
    /// A public HTTP request routed by `Host`.
    Http = 2,
    /// The listener's public TCP port.
    Tcp = 3,
}

impl Via {
    /// `dial`, `http` or `tcp`: the name every face shows (`PeerInfo.via` in Python and Node).
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Dial => "dial",
            Via::Http => "http",
            Via::Tcp => "tcp",
        }
    }
}

/// Written by the relay at the start of every stream it opens to a listener:
/// `version u8 (1) | via u8 | port u16 | addr_len u8 | client address (text)`. The listener
/// answers [`STREAM_ACCEPTED`] once the stream is queued for `accept()`; any other byte is the
/// [`crate::ErrorCode`] number of a refusal it knows to be final (`E2E_REFUSED`: a public request
/// to an e2e listener; `NOT_ALLOWED`: a stream to an exit listener that exposes no service), which
/// the relay passes on to the dialer or HTTP client; or it resets the stream (queue full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// How the stream arrived.
    pub via: Via,
    /// The port label a dialer asked for (0 = default), or the public port.
    pub port: u16,
    /// The original client's address as the relay saw it (`ip:port`).
    pub client: String,
}

/// The listener's one-byte answer to a [`StreamHeader`].
pub const STREAM_ACCEPTED: u8 = 0;

impl StreamHeader {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let addr = &self.client.as_bytes()[..self.client.len().min(255)];
        let mut b = Vec::with_capacity(5 + addr.len());
        b.push(1);
        b.push(self.via as u8);
        b.extend_from_slice(&self.port.to_be_bytes());
        b.push(addr.len() as u8);
        b.extend_from_slice(addr);
        b
    }

    /// Read one from a stream.
    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader> {
        let bad = |why: &str| Error::protocol(format!("malformed stream header from the relay ({why})"));
        let mut head = [0u8; 5];
        r.read_exact(&mut head).await.map_err(|e| Error::from_io(e, "reading a stream header"))?;
        if head[0] != 1 {
            return Err(bad("unknown version"));
        }
        let via = match head[1] {
            1 => Via::Dial,
            2 => Via::Http,
            3 => Via::Tcp,
            _ => return Err(bad("unknown route")),
        };
        let port = u16::from_be_bytes([head[2], head[3]]);
        let mut addr = vec![0u8; head[4] as usize];
        r.read_exact(&mut addr).await.map_err(|e| Error::from_io(e, "reading a stream header"))?;
        let client = String::from_utf8(addr).map_err(|_| bad("address is not text"))?;
        Ok(StreamHeader { via, port, client })
    }
}

/// First byte of an [`ExitHeader`] (a [`StreamHeader`] starts with 1).
pub const EXIT_HEADER_VERSION: u8 = 2;

/// Written by the relay at the start of a stream it opens to an **exit listener** for a dialer's
/// `HOST@EXIT` CONNECT: `version u8 (2) | dialer key id u32 BE | addr_len u8 | client address`.
/// The exit answers [`STREAM_ACCEPTED`] (or resets), then reads one SOCKS5 CONNECT request
/// (RFC 1928 request only: the session is already authenticated, no greeting), checks the target
/// against its own allowlist, connects, and answers one SOCKS5 reply, which the relay hands to
/// the dialer unchanged; then the stream carries the connection's bytes. Only listeners that
/// registered with [`ListenHello::exit`] are ever sent one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitHeader {
    /// The dialer's key id (who is connecting, for the exit's log).
    pub kid: u32,
    /// The dialer's address as the relay saw it.
    pub client: String,
}

impl ExitHeader {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let addr = &self.client.as_bytes()[..self.client.len().min(255)];
        let mut b = Vec::with_capacity(6 + addr.len());
        b.push(EXIT_HEADER_VERSION);
        b.extend_from_slice(&self.kid.to_be_bytes());
        b.push(addr.len() as u8);
        b.extend_from_slice(addr);
        b
    }
}

/// What the relay opened a stream to a listener for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A stream for `accept()`.
    Stream(StreamHeader),
    /// A dialer's stream for an exit listener to connect onwards.
    Exit(ExitHeader),
}

impl Incoming {
    /// Read the header of a stream the relay opened ([`StreamHeader`] or [`ExitHeader`]).
    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Incoming> {
        let io = |e| Error::from_io(e, "reading a stream header");
        let mut v = [0u8; 1];
        r.read_exact(&mut v).await.map_err(io)?;
        if v[0] != EXIT_HEADER_VERSION {
            let mut chained = tokio::io::AsyncReadExt::chain(&v[..], r);
            return StreamHeader::read_from(&mut chained).await.map(Incoming::Stream);
        }
        let mut head = [0u8; 5];
        r.read_exact(&mut head).await.map_err(io)?;
        let kid = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let mut addr = vec![0u8; head[4] as usize];
        r.read_exact(&mut addr).await.map_err(io)?;
        let client = String::from_utf8(addr).map_err(|_| Error::protocol("malformed exit stream header from the relay (address is not text)"))?;
        Ok(Incoming::Exit(ExitHeader { kid, client }))
    }
}

pub use crate::mux::frame::{Frame, FrameKind, FRAME_HEADER};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_connect_matches_the_documented_bytes() {
        let nonce: Vec<u8> = (1u8..=32).collect();
        let mut m = ServerConnect::new(&nonce);
        m.server_version = "devel".into();
        let bytes = m.encode_bytes();
        assert_eq!(bytes.len(), 60);
        let mut expect = hex::decode("0a0f").unwrap();
        expect.extend_from_slice(b"emissary-server");
        expect.extend_from_slice(&hex::decode("1205").unwrap());
        expect.extend_from_slice(b"devel");
        expect.extend_from_slice(&hex::decode("18012220").unwrap());
        expect.extend_from_slice(&nonce);
        assert_eq!(bytes, expect);
        assert_eq!(ServerConnect::decode_checked(&bytes).unwrap(), nonce);
    }

    #[test]
    fn server_connect_checks_like_the_go_client() {
        let mut m = ServerConnect::new(&[1; 32]);
        m.server_software = "nginx".into();
        assert!(ServerConnect::decode_checked(&m.encode_bytes()).is_err());
        let m = ServerConnect::new(&[0; 32]);
        assert!(ServerConnect::decode_checked(&m.encode_bytes()).is_err());
        let m = ServerConnect::new(&[1; 31]);
        assert!(ServerConnect::decode_checked(&m.encode_bytes()).is_err());
        let mut m = ServerConnect::new(&[1; 32]);
        m.protocol_version = 2;
        assert!(ServerConnect::decode_checked(&m.encode_bytes()).is_err());
        assert!(ServerConnect::decode_checked(b"\xff\xff\xff").is_err());
    }

    #[tokio::test]
    async fn server_connect_reads_from_a_byte_stream() {
        let m = ServerConnect::new(&[9; 32]);
        let mut bytes = m.encode_bytes();
        bytes.extend_from_slice(b"\x05\x01\x02"); // what follows must stay unread
        let mut r = &bytes[..];
        assert_eq!(read_server_connect(&mut r).await.unwrap(), vec![9; 32]);
        assert_eq!(r, b"\x05\x01\x02");
    }

    #[test]
    fn hello_round_trip_and_garbage() {
        let lh = ListenHello {
            public_key: vec![1; 32],
            signature: vec![2; 64],
            name: "api".into(),
            tcp_port: true,
            pool: true,
            exit: false,
            h2c: true,
            tls_passthrough: false,
            instance: vec![9; 16],
        };
        assert_eq!(ListenHello::decode_frame(&lh.encode_frame()).unwrap(), lh);
        assert!(ListenHello::decode_frame(&ListenHello { instance: vec![9; 33], ..lh.clone() }.encode_frame()).is_err());
        assert!(ListenHello::decode_frame(&[LISTEN_HELLO_TAG, 0xff]).is_err());
        assert!(ListenHello::decode_frame(&ListenHello { public_key: vec![1; 31], ..lh.clone() }.encode_frame()).is_err());
        let ack = ListenAck::refused(ErrorCode::NameTaken, "taken");
        assert_eq!(ListenAck::decode_frame(&ack.encode_frame()).unwrap_err().code(), ErrorCode::NameTaken);
        let h = Hello { date: "Tue, 30 Jan 2024 10:00:00 GMT".into(), sig: "abc".into() };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        assert!(Hello::decode(&[]).is_err());
        assert!(Hello::decode(&[2, 0, 0]).is_err());
        assert!(Hello::decode(&[1, 200, 0]).is_err());
        let ack = HelloAck { refusal: Some((ErrorCode::AuthClockSkew, "late".into())) };
        assert_eq!(HelloAck::decode(&ack.encode()).unwrap(), ack);
        assert_eq!(HelloAck::decode(&HelloAck { refusal: None }.encode()).unwrap().refusal, None);
    }

    #[tokio::test]
    async fn exit_headers() {
        let h = StreamHeader { via: Via::Http, port: 8, client: "127.0.0.1:9".into() };
        let mut r = &h.encode()[..];
        assert_eq!(Incoming::read_from(&mut r).await.unwrap(), Incoming::Stream(h));
        let e = ExitHeader { kid: 7, client: "127.0.0.1:1".into() };
        let mut r = &e.encode()[..];
        assert_eq!(Incoming::read_from(&mut r).await.unwrap(), Incoming::Exit(e));
        // Old listeners' registrations decode with pool/exit off; old relays' answers likewise.
        let old = ListenHello {
            public_key: vec![1; 32],
            signature: vec![2; 64],
            name: "api".into(),
            tcp_port: false,
            pool: false,
            exit: false,
            ..Default::default()
        };
        let new = ListenHello { pool: true, exit: true, ..old.clone() };
        assert_eq!(ListenHello::decode_frame(&old.encode_frame()).unwrap(), old);
        assert_eq!(ListenHello::decode_frame(&new.encode_frame()).unwrap(), new);
    }
}
