//! Listener registrations made by hand over a raw WebSocket (what a stale or misbehaving
//! listener sends), for tests of the relay's registration rules.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue};
use libtunnel::protocol::{ListenAck, ListenHello, ServerConnect, MUX_SUBPROTOCOL};
use libtunnel::Identity;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub type RawWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

const STEP: Duration = Duration::from_secs(10);

/// The next binary message from the relay (`None` once it closed).
pub async fn next_binary(ws: &mut RawWs) -> Option<Bytes> {
    loop {
        match tokio::time::timeout(STEP, ws.next()).await.expect("a message from the relay within 10 s") {
            Some(Ok(Message::Binary(b))) => return Some(b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(m)) => panic!("unexpected message {m:?}"),
        }
    }
}

/// Register by hand over a raw WebSocket: `make` builds the hello from the relay's nonce.
pub async fn raw_register(relay_url: &str, make: impl FnOnce(&[u8]) -> ListenHello) -> (RawWs, libtunnel::Result<ListenAck>) {
    let mut req = relay_url.into_client_request().expect("request");
    req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(MUX_SUBPROTOCOL));
    let (mut ws, resp) =
        tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req)).await.expect("raw WebSocket within 10 s").expect("upgrade");
    assert_eq!(resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).map(|v| v.as_bytes()), Some(MUX_SUBPROTOCOL.as_bytes()));
    let pre = next_binary(&mut ws).await.expect("preamble");
    let nonce = ServerConnect::decode_checked(&pre).expect("a valid preamble");
    ws.send(Message::Binary(make(&nonce).encode_frame())).await.expect("send hello");
    let answer = next_binary(&mut ws).await.expect("an answer");
    (ws, ListenAck::decode_frame(&answer))
}

/// A registration of `name` signed by `id` over `nonce`.
pub fn hello(id: &Identity, nonce: &[u8], name: &str) -> ListenHello {
    ListenHello {
        public_key: id.public_key().to_vec(),
        signature: id.sign_registration(nonce, name).to_vec(),
        name: name.into(),
        ..Default::default()
    }
}
