//! The two ends of an E2E stream: [`Dialing::dial`] (send the CONNECT and the ClientHello in one
//! go, take the relay's SOCKS5 reply off the front, verify the listener's key, wait for admission
//! in mutual mode) and [`Accepting::accept`] (terminate TLS on a stream the relay opened, refuse
//! anything that is not a verified E2E dial). [`E2eStream`] is what both hand on: plaintext
//! `AsyncRead + AsyncWrite` over the tunnel stream, half-close as `close_notify` + FIN.

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{BufMut, BytesMut};
use rustls::client::Resumption;
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::keys::{certified, key_of, provider};
use super::verify::{DialerCheck, DialerKey, ListenerCheck};
use super::{DialerE2e, ListenerE2e};
use crate::error::{Error, ErrorCode, Result};
use crate::identity::Identity;
use crate::mux::MAX_DATA;
use crate::protocol::FRAME_HEADER;
use crate::session::SessionStream;
use crate::socks::{self, Target};

/// The listener's answer after a mutual handshake: the dialer's key is admitted.
const ADMITTED: u8 = 0;

/// The transport under an E2E stream's TLS: the tunnel stream, with (dialer side) the relay's
/// SOCKS5 reply taken off its front before TLS reads anything.
pub(crate) struct E2eIo {
    mux: SessionStream,
    reply: Option<(Target, BytesMut)>,
}

impl E2eIo {
    /// Take the relay's SOCKS5 reply off the front of the stream (dialer side, once): ready when
    /// it said yes, an error carrying the refusal's code when it said no.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((target, got)) = &mut self.reply else { return Poll::Ready(Ok(())) };
        loop {
            let chunk = match ready!(self.mux.poll_recv_chunk(cx)) {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => return Poll::Ready(Err(Error::protocol("the relay ended the stream before answering the CONNECT").into_io())),
                Ok(Some(c)) => c,
            };
            got.extend_from_slice(&chunk);
            match socks::parse_pipelined_reply(got, target) {
                None => continue,
                Some(Err(e)) => return Poll::Ready(Err(e.into_io())),
                Some(Ok(used)) => {
                    let rest = got.split_off(used).freeze();
                    if !rest.is_empty() {
                        self.mux.unread(rest);
                    }
                    self.reply = None;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// A write failed: when the relay's reply is still unread, it may say why (a refused CONNECT
    /// is answered, then the stream reset, possibly before the ClientHello went out).
    fn explain(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        if self.reply.is_none() {
            return e;
        }
        match self.poll_reply(cx) {
            Poll::Ready(Err(r)) => {
                let refusal = Error::from_io(r, "reading the relay's answer to CONNECT");
                if refusal.code() == ErrorCode::Closed {
                    e
                } else {
                    refusal.into_io()
                }
            }
            _ => e,
        }
    }
}

impl AsyncRead for E2eIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_reply(cx))?;
        Pin::new(&mut this.mux).poll_read(cx, buf)
    }
}

impl AsyncWrite for E2eIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.mux).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.explain(cx, e))),
            other => other,
        }
    }
    /// rustls hands over every queued TLS record at once (16 KiB each): they go out as one mux
    /// frame (up to the stream's credit and the frame limit) instead of a frame per record, which
    /// keeps the per-frame work of both ends and of the relay's splice where plaintext has it.
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = match ready!(this.mux.poll_reserve(cx, total.min(MAX_DATA))) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(this.explain(cx, e))),
        };
        let mut frame = BytesMut::with_capacity(FRAME_HEADER + n);
        frame.put_bytes(0, FRAME_HEADER);
        let mut left = n;
        for b in bufs {
            let k = b.len().min(left);
            frame.put_slice(&b[..k]);
            left -= k;
            if left == 0 {
                break;
            }
        }
        if let Err(e) = this.mux.send_frame(frame) {
            return Poll::Ready(Err(this.explain(cx, e)));
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().mux).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().mux).poll_shutdown(cx)
    }
}

/// An end-to-end encrypted tunnel stream (plaintext on this side, TLS 1.3 on the wire).
pub struct E2eStream {
    tls: tokio_rustls::TlsStream<E2eIo>,
}

impl E2eStream {
    /// The peer's Ed25519 public key when it presented one (the dialer's, in mutual mode).
    pub fn peer_key(&self) -> Option<[u8; 32]> {
        self.tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(key_of)
    }
}

impl AsyncRead for E2eStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for E2eStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// A dialer's E2E settings, checked once (the identity loaded into rustls) at build time.
#[derive(Debug, Clone)]
pub(crate) struct Dialing {
    cfg: DialerE2e,
    key: Option<Arc<CertifiedKey>>,
}

fn alert_of(e: &io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

impl Dialing {
    pub(crate) fn new(cfg: DialerE2e) -> Result<Dialing> {
        let key = cfg.identity_ref().map(certified).transpose()?;
        Ok(Dialing { cfg, key })
    }

    /// The key-derived name `target`'s listener must prove, or why it cannot be dialed end to end
    /// (checked before anything is sent).
    pub(crate) fn expected(&self, target: &Target) -> Result<String> {
        let name = target.host.to_ascii_lowercase();
        if !crate::identity::valid_name(&name) {
            return Err(Error::argument(format!(
                "end-to-end encryption works with listener names only (dial NAME:PORT with NAME a single label), not {:?}; \
                 dial other targets with a dialer that has e2e off",
                target.host
            )));
        }
        self.cfg.expected_name(&name).ok_or_else(|| {
            Error::new(
                ErrorCode::E2eIdentity,
                format!(
                    "{name} is a chosen (relay-granted) name, so nothing proves which key holds it and the relay could answer for it; \
                     pin the listener's key: `--e2e-pin {name}=KEY` (KEY: its base64 public key or key-derived name, printed by `tunnel keygen --listener`)"
                ),
            )
        })
    }

    /// Run the E2E handshake on a fresh stream to `target`: the CONNECT request and the
    /// ClientHello leave together; the relay's reply is read before the listener's first flight.
    pub(crate) async fn dial(&self, mut mux: SessionStream, target: &Target, expect: String) -> Result<E2eStream> {
        let name = target.host.to_ascii_lowercase();
        let check = Arc::new(ListenerCheck { dialed: name.clone(), expect, failure: Mutex::new(None) });
        let me = Arc::new(DialerKey { key: self.key.clone(), asked: AtomicBool::new(false) });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::new(ErrorCode::General, format!("rustls config: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(check.clone())
            .with_client_cert_resolver(me.clone());
        config.enable_sni = false;
        config.resumption = Resumption::disabled();
        let server_name = ServerName::try_from(name.clone()).map_err(|e| Error::argument(format!("{name:?} is not a DNS name: {e}")))?;
        let request = socks::pipelined_connect_request(target)?;
        mux.write_all(&request).await.map_err(|e| Error::from_io(e, "sending the CONNECT request"))?;
        let io = E2eIo { mux, reply: Some((target.clone(), BytesMut::new())) };
        let mut tls = match TlsConnector::from(Arc::new(config)).connect(server_name, io).await {
            Ok(t) => t,
            Err(e) => return Err(check.take_failure().unwrap_or_else(|| handshake_error(e, &name))),
        };
        if me.was_asked() {
            let mut answer = [0u8; 1];
            match tls.read_exact(&mut answer).await {
                Ok(_) if answer[0] == ADMITTED => {}
                Ok(_) => return Err(Error::protocol(format!("listener {name} sent an unknown admission answer {:#04x}", answer[0]))),
                Err(e) => return Err(self.refusal(e, &name)),
            }
        }
        Ok(E2eStream { tls: tokio_rustls::TlsStream::Client(tls) })
    }

    /// What a failed wait for admission means (mutual mode): an alert or an end of stream is the
    /// listener turning this dialer's key (or its lack of one) away.
    fn refusal(&self, e: io::Error, name: &str) -> Error {
        if alert_of(&e).is_none() && e.kind() != io::ErrorKind::UnexpectedEof {
            return Error::from_io(e, &format!("waiting for listener {name} to admit this dialer"));
        }
        let message = match self.cfg.identity_ref().map(Identity::name) {
            None => format!(
                "listener {name} requires the dialer's own key (mutual mode) and this dialer has none; give it an identity \
                 (`--e2e-identity FILE`, made with `tunnel keygen --listener`) and have the listener admit it (`--allow-peer KEY`)"
            ),
            Some(me) => format!(
                "listener {name} does not admit this dialer's key ({me}); ask its operator to add it with `tunnel listen --e2e --allow-peer {me}`"
            ),
        };
        Error::new(ErrorCode::E2eRefused, message)
    }
}

/// A failed client handshake that was not our key check: the relay's refusal of the CONNECT
/// (offline name, ...) keeps its code; a peer that does not speak our TLS is `E2E_IDENTITY`.
fn handshake_error(e: io::Error, name: &str) -> Error {
    if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
        return Error::new(
            ErrorCode::E2eIdentity,
            format!("listener {name} did not complete an end-to-end handshake ({e}); it must run with e2e on (`tunnel listen --e2e`)"),
        );
    }
    Error::from_io(e, &format!("end-to-end handshake with {name}"))
}

/// A listener's E2E side: one rustls server config for every stream.
#[derive(Clone)]
pub(crate) struct Accepting {
    acceptor: TlsAcceptor,
    mutual: bool,
}

impl std::fmt::Debug for Accepting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepting").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl Accepting {
    pub(crate) fn new(identity: &Identity, cfg: ListenerE2e) -> Result<Accepting> {
        let mutual = cfg.is_mutual();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::new(ErrorCode::General, format!("rustls config: {e}")))?
            .with_client_cert_verifier(Arc::new(DialerCheck { cfg }))
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(certified(identity)?)));
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(Accepting { acceptor: TlsAcceptor::from(Arc::new(config)), mutual })
    }

    /// Terminate TLS on a stream the relay opened. A stream that is not a TLS handshake (a
    /// plaintext dial, a public HTTP request) or whose dialer is not admitted is refused: the
    /// alert (if any) goes out, then the stream ends. A stream that sends nothing within
    /// `first_bytes` is refused too, reset with `E2E_REFUSED`: an e2e dialer's ClientHello rides
    /// with its CONNECT, so the relay hands it on as soon as the stream is accepted, and a silent
    /// stream is a plaintext client waiting for the service to speak first (ssh, SMTP).
    pub(crate) async fn accept(&self, mut mux: SessionStream, first_bytes: std::time::Duration) -> Result<E2eStream> {
        match tokio::time::timeout(first_bytes, std::future::poll_fn(|cx| mux.poll_recv_chunk(cx))).await {
            Ok(Ok(Some(chunk))) => mux.unread(chunk),
            // The end of the stream or an error: the handshake below reports it.
            Ok(_) => {}
            Err(_) => {
                mux.reset(ErrorCode::E2eRefused);
                let why = format!(
                    "refused a stream that sent no end-to-end handshake within {} s (a plaintext dial to an e2e listener, \
                     waiting for the service to speak first; dial it with e2e on)",
                    first_bytes.as_secs_f64()
                );
                tracing::info!(reason = %why, "e2e listener refused a stream");
                return Err(Error::new(ErrorCode::E2eRefused, why));
            }
        }
        match self.acceptor.accept(E2eIo { mux, reply: None }).into_fallible().await {
            Ok(mut tls) => {
                if self.mutual {
                    tls.write_all(&[ADMITTED]).await.map_err(|e| Error::from_io(e, "admitting an E2E dialer"))?;
                    tls.flush().await.map_err(|e| Error::from_io(e, "admitting an E2E dialer"))?;
                }
                Ok(E2eStream { tls: tokio_rustls::TlsStream::Server(tls) })
            }
            Err((e, mut io)) => {
                let plaintext =
                    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).is_some_and(|r| matches!(r, rustls::Error::InvalidMessage(_)));
                if plaintext {
                    // A plaintext dialer cannot read a TLS alert: reset the stream with the
                    // refusal's code, which the relay hands on, so the dial fails E2E_REFUSED.
                    io.mux.reset(ErrorCode::E2eRefused);
                } else {
                    let _ = io.shutdown().await;
                }
                let why = if plaintext {
                    "refused a stream that is not end-to-end encrypted (a plaintext dial or public request to an e2e listener; dial it with e2e on)"
                        .to_string()
                } else {
                    format!("refused an end-to-end stream: {e}")
                };
                tracing::info!(reason = %why, "e2e listener refused a stream");
                Err(Error::new(ErrorCode::E2eRefused, why))
            }
        }
    }
}
