//! `tunnel demo`: the embedded default. A relay, a private demo service and dials through them,
//! then a service behind a listener reached by name and by a public HTTP request, all on
//! loopback, narrated step by step, so a new user sees both halves work in one command.

use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::auth::{Key, KeySet};
use crate::config::RelayConfig;
use crate::dialer::Dialer;
use crate::egress::allowlist::Allowlist;
use crate::error::{Error, ErrorCode, Result};
use crate::relay::Server;
use crate::stream::Mode;

/// Length header that asks the demo service to hash until end of stream (half-close) rather
/// than a fixed byte count. Classic mode has no half-close, so it sends the real length.
const UNTIL_EOF: u64 = u64::MAX;

/// Start the demo service: each connection sends an 8-byte big-endian length (or [`UNTIL_EOF`])
/// and then the payload; the service answers with the SHA-256 of the payload.
async fn demo_service() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await.map_err(|e| Error::from_io(e, "binding the demo service"))?;
    let addr = l.local_addr().map_err(|e| Error::from_io(e, "demo service address"))?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let Ok(mut left) = s.read_u64().await else {
                    return;
                };
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match s.read(&mut buf[..want]).await {
                        Ok(0) if left == UNTIL_EOF => break,
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            h.update(&buf[..n]);
                            if left != UNTIL_EOF {
                                left -= n as u64;
                            }
                        }
                    }
                }
                let _ = s.write_all(format!("sha256={}\n", hex_lower(&h.finalize())).as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A tiny HTTP service (the one behind the listener): answers every request with a greeting that
/// names the client the relay saw (`X-Forwarded-For`, when the request came through the public port).
async fn greeting_service() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await.map_err(|e| Error::from_io(e, "binding the greeting service"))?;
    let addr = l.local_addr().map_err(|e| Error::from_io(e, "greeting service address"))?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let via = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-forwarded-for: ").or_else(|| l.strip_prefix("X-Forwarded-For: ")))
                    .map(|c| format!(" (the relay says you are {})", c.trim()))
                    .unwrap_or_default();
                let body = format!("hello from behind the listener{via}\n");
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// One HTTP/1.1 GET over `io` with `Host: host`; returns the status line and the body.
async fn http_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S, host: &str) -> Result<(String, String)> {
    io.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| Error::from_io(e, "sending the demo request"))?;
    let mut answer = String::new();
    io.read_to_string(&mut answer).await.map_err(|e| Error::from_io(e, "reading the demo answer"))?;
    let status = answer.lines().next().unwrap_or_default().to_string();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
    Ok((status, body))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Run the demo and print what happens; returns an error if any step misbehaves.
pub async fn run() -> Result<()> {
    let key = Key::new(1, rand::random::<[u8; 32]>().to_vec())?;
    let service = demo_service().await?;
    println!("1. started a private demo service on {service} (it answers with the SHA-256 of what it receives)");
    let allow = Allowlist::from_json(&format!(r#"[{{"host":"127.0.0.1","port":{}}}]"#, service.port()), "demo allowlist")?;
    let mut cfg = RelayConfig::new(KeySet::new([key.clone()])?, allow);
    cfg.http_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.listeners_open = true;
    let relay = Server::bind(cfg).await?.spawn();
    let http = relay.http_addr().ok_or_else(|| Error::new(ErrorCode::General, "the demo relay has no public HTTP port"))?;
    println!(
        "2. started a relay at {} (key id 1, allowlist: 127.0.0.1:{}; public HTTP port {http}, open to any listener key)",
        relay.url(),
        service.port()
    );

    let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expect = format!("sha256={}\n", hex_lower(&Sha256::digest(&payload)));
    for mode in [Mode::Multiplexed, Mode::Classic] {
        let dialer = Dialer::builder(relay.url()).key(key.clone()).mode(mode).build()?;
        let t0 = Instant::now();
        let mut s = dialer.dial(&service.to_string()).await?;
        let connected = t0.elapsed();
        let (mut rd, mut wr) = tokio::io::split(&mut s);
        let (w, r) = tokio::join!(
            async {
                if mode == Mode::Multiplexed {
                    wr.write_u64(UNTIL_EOF).await?;
                    wr.write_all(&payload).await?;
                    wr.shutdown().await?; // half-close: the service sees EOF and still answers
                } else {
                    wr.write_u64(payload.len() as u64).await?;
                    wr.write_all(&payload).await?;
                }
                std::io::Result::Ok(())
            },
            async {
                let mut answer = String::new();
                rd.read_to_string(&mut answer).await.map(|_| answer)
            }
        );
        w.map_err(|e| Error::from_io(e, "writing"))?;
        let answer = r.map_err(|e| Error::from_io(e, "reading"))?;
        if answer != expect {
            return Err(Error::new(ErrorCode::General, format!("demo service answered {answer:?}, expected {expect:?}")));
        }
        dialer.close().await;
        let ms = connected.as_secs_f64() * 1e3;
        match mode {
            Mode::Multiplexed => println!(
                "3a. multiplexed mode: dialed {service} in {ms:.1} ms, sent 8 MiB, half-closed, got back the matching {}",
                answer.trim()
            ),
            Mode::Classic => println!(
                "3b. classic (Emissary-compatible) mode: dialed in {ms:.1} ms, sent 8 MiB, got back the matching {}; the service's EOF closed the tunnel",
                answer.trim()
            ),
        }
    }

    let dialer = Dialer::new(relay.url(), key.clone())?;
    match dialer.dial("127.0.0.1:1").await {
        Err(e) if e.code() == ErrorCode::NotAllowed => println!("4. a target outside the allowlist is refused: [{}] {e}", e.code()),
        other => return Err(Error::new(ErrorCode::General, format!("expected NOT_ALLOWED for 127.0.0.1:1, got {other:?}"))),
    }
    let wrong = Dialer::new(relay.url(), Key::new(1, b"not the secret".to_vec())?)?;
    match wrong.dial(&service.to_string()).await {
        Err(e) if e.code() == ErrorCode::AuthFailed => {
            println!("5. a wrong secret is refused: [{}] {e}", e.code())
        }
        other => return Err(Error::new(ErrorCode::General, format!("expected AUTH_FAILED for a wrong secret, got {other:?}"))),
    }
    wrong.close().await;

    // The other half: a service behind NAT, published through a listener.
    let greeting = greeting_service().await?;
    let id = crate::identity::Identity::generate();
    let listener = crate::listener::Listener::builder(relay.url(), id).bind().await?;
    let name = listener.name();
    println!("6. a listener registered as {name} (the name is derived from its Ed25519 key) for a service on {greeting}");
    let exposing = tokio::spawn(crate::forward::expose(listener, greeting.to_string(), false, std::future::pending()));
    let by_name = dialer.dial(&format!("{name}:0")).await?;
    let (status, body) = http_get(by_name, "demo").await?;
    println!("6a. dialed it by name ({name}:0) through the relay: {status}, {body:?}");
    let public = tokio::net::TcpStream::connect(http).await.map_err(|e| Error::from_io(e, "connecting to the public HTTP port"))?;
    let (status, body) = http_get(public, &format!("{name}.localhost:{}", http.port())).await?;
    println!("6b. a public HTTP request for Host {name}.localhost reached it: {status}, {body:?}");
    exposing.abort();
    dialer.close().await;
    relay.shutdown().await?;
    println!("7. relay shut down cleanly. Next: `tunnel keygen`, then `tunnel server`, `tunnel forward` and `tunnel listen` (see README.md)");
    Ok(())
}
