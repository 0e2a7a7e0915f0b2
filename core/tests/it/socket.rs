//! The plain-socket face of a tunnel stream (`libtunnel::fd`), which the C, Python and Node
//! bindings hand to programs: bytes hashed both ways through blocking std sockets, half-close with
//! `shutdown(Write)`, and a relay cut off mid-transfer read as a reset, never as a clean EOF.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use libtunnel::{Dialer, Mode};
use testkit::*;

const STEP: Duration = Duration::from_secs(10);
const MIB: usize = 1024 * 1024;

fn dialer(url: &str, mode: Mode) -> Dialer {
    Dialer::builder(url).key(key()).mode(mode).timeout(STEP).build().expect("valid dialer settings")
}

/// Write `data` from one thread, half-close, read the target's SHA-256 reply on another.
fn hash_through_blocking_socket(mut sock: std::net::TcpStream, data: Vec<u8>) -> Vec<u8> {
    sock.set_read_timeout(Some(STEP)).unwrap();
    let mut writer = sock.try_clone().expect("clone the socket");
    let w = std::thread::spawn(move || {
        writer.write_all(&data).expect("write through the socket");
        writer.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    });
    let mut reply = Vec::new();
    sock.read_to_end(&mut reply).expect("the read side stays open after our half-close");
    w.join().unwrap();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_socket_hashes_and_half_closes_in_both_modes() {
    init_tracing();
    let data = payload(16 * MIB + 3, 9);
    let want = sha256(&data).to_vec();
    let hasher = hash_after_eof_server().await;
    // Classic mode has no half-close (Emissary's protocol): the target never sees our EOF, so it
    // is one that answers after reading everything; the reply must still arrive after our
    // shutdown(Write), until the target closes.
    let replier = reply_then_close_server(data.len(), want.clone()).await;
    let relay = start_relay(relay_config(allow_ports(&[hasher.port(), replier.port()]))).await;
    for (mode, target) in [(Mode::Multiplexed, hasher), (Mode::Classic, replier)] {
        let d = dialer(relay.url(), mode);
        let stream = within(STEP, "dial", d.dial(&target.to_string())).await.expect("dial the target");
        let sock = libtunnel::fd::into_socket(stream).await.expect("a local socket for the stream");
        let data = data.clone();
        let got = tokio::task::spawn_blocking(move || hash_through_blocking_socket(sock, data)).await.unwrap();
        assert_eq!(got, want, "wrong reply after a half-close ({mode:?})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_death_reaches_the_blocking_socket_as_a_reset() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    let stream = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial the echo target");
    let mut sock = libtunnel::fd::into_socket(stream).await.expect("a local socket for the stream");
    let outcome = tokio::task::spawn_blocking(move || {
        sock.set_read_timeout(Some(STEP)).unwrap();
        sock.write_all(b"before the cut").unwrap();
        let mut buf = [0u8; 14];
        sock.read_exact(&mut buf).expect("the echo before the relay dies");
        assert_eq!(&buf, b"before the cut");
        sock
    })
    .await
    .unwrap();
    relay.abort();
    let err = tokio::task::spawn_blocking(move || {
        let mut sock = outcome;
        let mut buf = [0u8; 1024];
        loop {
            match sock.read(&mut buf) {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .unwrap();
    let err = err.expect("a relay that died must not look like a clean end of stream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "expected ECONNRESET, got {err}");
}
