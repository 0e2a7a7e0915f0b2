//! Writes the seed corpus (`cargo run --bin seeds -- corpus`): a few valid and near-valid inputs
//! per target, built with libtunnel's own encoders so they track the wire format.
use std::path::Path;

use libtunnel::identity::Identity;
use libtunnel::protocol::{Frame, FrameKind, Hello, ListenAck, ListenHello, ServerConnect, StreamHeader, Via};
use libtunnel_fuzz::entries::{key, NONCE};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join(format!("seed-{name}")), bytes).expect("write seed");
}

fn connect_domain(host: &[u8], port: u16) -> Vec<u8> {
    let mut v = vec![5, 1, 0, 3, host.len() as u8];
    v.extend_from_slice(host);
    v.extend_from_slice(&port.to_be_bytes());
    v
}

fn records(flags: u8, frames: &[bytes::Bytes]) -> Vec<u8> {
    let mut v = vec![flags];
    for f in frames {
        v.extend_from_slice(&(f.len() as u16).to_be_bytes());
        v.extend_from_slice(f);
    }
    v
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);

    // socks5: session mode (pipelined greeting + CONNECT) and classic mode (greeting, RFC 1929, CONNECT).
    let hosts: &[&[u8]] = &[
        b"db.internal", b"127.1", b"0x7f.1", b"2130706433", b"0177.0.0.1", b"[::ffff:127.0.0.1]", b"LOCALHOST.",
        "ｌｏｃａｌｈｏｓｔ".as_bytes(), b"%31%32%37.0.0.1", "bücher.svc.test".as_bytes(), b"10.1.2.3", b"api.relay.test",
    ];
    for (i, h) in hosts.iter().enumerate() {
        let mut v = vec![0u8, 5, 1, 0];
        v.extend_from_slice(&connect_domain(h, 5432));
        put(dir, "socks5", &format!("domain-{i}"), &v);
    }
    put(dir, "socks5", "ipv4", &[0, 5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
    put(dir, "socks5", "ipv6", &[0, 5, 1, 0, 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1, 0, 80]);
    put(dir, "socks5", "bind", &[0, 5, 1, 0, 5, 2, 0, 1, 10, 0, 0, 1, 0, 80]);
    put(dir, "socks5", "bad-atyp", &[0, 5, 1, 0, 5, 1, 0, 9, 10, 0, 0, 1, 0, 80]);
    let date = "Tue, 30 Jan 2024 10:00:00 GMT";
    let sig = key().sign_with_date(&NONCE, date);
    let mut v = vec![1u8, 5, 2, 0, 2, 1, date.len() as u8];
    v.extend_from_slice(date.as_bytes());
    v.push(sig.len() as u8);
    v.extend_from_slice(sig.as_bytes());
    v.extend_from_slice(&connect_domain(b"db.internal", 5432));
    put(dir, "socks5", "classic", &v);
    put(dir, "socks5", "answers", &[2, 5, 0, 5, 0, 0, 1, 127, 0, 0, 1, 0x1f, 0x90]);

    // mux_frames: a peer opening, sending, granting, finishing, resetting, pinging.
    let e = Frame::encode;
    let server_side = [
        e(FrameKind::Open, 1, &[]),
        e(FrameKind::Data, 1, b"hello"),
        Frame::window(1, 4096),
        e(FrameKind::Fin, 1, &[]),
        e(FrameKind::Open, 3, &[]),
        e(FrameKind::Data, 3, &[7; 300]),
        Frame::rst(3, libtunnel::ErrorCode::Closed),
        e(FrameKind::Ping, 0, &[1; 8]),
        e(FrameKind::Pong, 0, &[1; 8]),
        e(FrameKind::GoAway, 0, &[]),
    ];
    put(dir, "mux_frames", "server", &records(0, &server_side));
    let client_side = [e(FrameKind::Open, 2, &[]), e(FrameKind::Data, 2, b"x"), e(FrameKind::Data, 1, b"y"), Frame::window(1, 1), e(FrameKind::Fin, 2, &[])];
    put(dir, "mux_frames", "client", &records(1, &client_side));
    put(dir, "mux_frames", "stale-open", &records(0, &[e(FrameKind::Open, 5, &[]), e(FrameKind::Open, 3, &[])]));

    // server_connect
    let nonce: Vec<u8> = (1u8..=32).collect();
    let pre = ServerConnect::new(&nonce).encode_bytes();
    put(dir, "server_connect", "valid", &pre);
    let mut more = pre.clone();
    more.extend_from_slice(b"\x05\x01\x02");
    put(dir, "server_connect", "trailing", &more);
    let mut bad = ServerConnect::new(&[0; 32]);
    bad.server_software = "nginx".into();
    put(dir, "server_connect", "wrong", &bad.encode_bytes());

    // auth_proof
    put(dir, "auth_proof", "hello", &Hello { date: date.into(), sig: sig.clone() }.encode());
    put(dir, "auth_proof", "rfc1929", format!("{date}\0{sig}").as_bytes());
    put(dir, "auth_proof", "rfc850", format!("Tuesday, 30-Jan-24 10:00:00 GMT\0{sig}").as_bytes());
    put(dir, "auth_proof", "ack", &[0, 0, 0, 2, 0, 4, b'l', b'a', b't', b'e']);

    // listen_hello
    let id = Identity::generate();
    let name = id.name();
    let h = ListenHello { public_key: id.public_key().to_vec(), signature: id.sign_registration(&NONCE, &name).to_vec(), name, tcp_port: true, pool: false, exit: false };
    put(dir, "listen_hello", "hello", &h.encode_frame());
    let h2 = ListenHello { name: "api".into(), ..h };
    put(dir, "listen_hello", "chosen", &h2.encode_frame());
    put(dir, "listen_hello", "ack", &ListenAck { name: "api".into(), http_url: "http://api.relay.test".into(), ..Default::default() }.encode_frame());
    put(dir, "listen_hello", "header", &StreamHeader { via: Via::Http, port: 80, client: "127.0.0.1:5555".into() }.encode());

    // http_host
    for (i, host) in ["api.relay.test", "relay.test", "API.Relay.Test.:8080", "[::1]:80", "a.b.relay.test", "-x.relay.test"].iter().enumerate() {
        let mut v = vec![1u8];
        v.extend_from_slice(host.as_bytes());
        put(dir, "http_host", &format!("host-{i}"), &v);
    }
    let raw = b"\0GET / HTTP/1.1\r\nHost: api.relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET http://x.relay.test/ HTTP/1.1\r\n\r\n";
    put(dir, "http_host", "raw", raw);

    // dial_route
    let derived = Identity::generate().name();
    for (i, host) in ["api", "api.relay.test", derived.as_str(), "127.0.0.1", "LOCALHOST", "0x7f.1", "[::1]", "x.relay.test."].iter().enumerate() {
        let mut v = 80u16.to_be_bytes().to_vec();
        v.extend_from_slice(host.as_bytes());
        put(dir, "dial_route", &format!("host-{i}"), &v);
    }

    // config
    let keys = format!(r#"[{{"kid":1,"data":"c2VjcmV0LXNlY3JldA=="}}]"#);
    let allow = r#"[{"host":"db.internal","port":5432},{"host":"10.0.0.0/8","port":"1000-2000"},{"host":"*.svc","port":"*"}]"#;
    put(dir, "config", "toml", format!("listen = \"127.0.0.1:1\"\nauth_keys = [{{kid = 1, data = \"c2VjcmV0\"}}]\nallow = [{{host = \"db\", port = 1}}]\nmax_streams = 10\n").as_bytes());
    put(dir, "config", "env", format!("\0\0TUNNEL_AUTH_KEYS={keys}\nTUNNEL_ALLOW={allow}\nTUNNEL_CONNECT_TIMEOUT=2.5\nTUNNEL_TCP_PORTS=20000-20010\0").as_bytes());
    put(dir, "config", "emissary", format!("\0EMISSARY_AUTH_KEYS={keys}\nEMISSARY_ALLOWED_PROXY_TARGETS={allow}\nEMISSARY_DNS_SERVERS=1.1.1.1 [::1]:53\0\0http_timeout=3").as_bytes());
}
