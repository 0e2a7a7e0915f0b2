//! `tunnel demo`: the embedded default. A relay, a private demo service and dials through them,
//! all on loopback, narrated step by step, so a new user sees the whole path work in one command.

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

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Run the demo and print what happens; returns an error if any step misbehaves.
pub async fn run() -> Result<()> {
    let key = Key::new(1, rand::random::<[u8; 32]>().to_vec())?;
    let service = demo_service().await?;
    println!("1. started a private demo service on {service} (it answers with the SHA-256 of what it receives)");
    let allow = Allowlist::from_json(&format!(r#"[{{"host":"127.0.0.1","port":{}}}]"#, service.port()), "demo allowlist")?;
    let relay = Server::bind(RelayConfig::new(KeySet::new([key.clone()])?, allow)).await?.spawn();
    println!("2. started a relay at {} (key id 1, allowlist: 127.0.0.1:{})", relay.url(), service.port());

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
    dialer.close().await;
    wrong.close().await;
    relay.shutdown().await?;
    println!("6. relay shut down cleanly. Next: `tunnel keygen`, then `tunnel server` and `tunnel forward` (see README.md)");
    Ok(())
}
