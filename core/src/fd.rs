//! Hand a [`TunnelStream`] to code that wants a plain socket (the C, Python and Node faces): the
//! stream is bridged to one end of a connected loopback TCP pair, and the caller gets the other end
//! as an ordinary blocking `std::net::TcpStream` whose file descriptor works with `read`, `write`,
//! `poll`, `shutdown(SHUT_WR)`, `makefile`, `selectors` and `net.Socket`.
//!
//! Why TCP and not `socketpair(AF_UNIX)`: a tunnel cut off mid-transfer must reach the program as
//! an error, not as a clean end of stream. A TCP socket closed with a zero linger sends a reset, so
//! the caller's `read` fails with `ECONNRESET`; a Unix socket has no way to say that. Half-close maps
//! both ways: the caller's `shutdown(SHUT_WR)` becomes the tunnel's FIN, and the tunnel's FIN becomes
//! end of stream on the caller's socket.
//!
//! The pair is made on 127.0.0.1 with a listener that lives for one accept; a connection from
//! anyone but our own connecting socket is dropped, so no other local process can take its place.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::error::{Error, Result};
use crate::stream::TunnelStream;

/// How many stray connections to the pair's listener we drop before giving up.
const MAX_STRAYS: usize = 16;

/// Bridge `stream` to a new local socket and return the caller's end, in blocking mode. Must be
/// called inside a Tokio runtime, which runs the bridge until both directions finish; the bridge
/// holds no reference the caller has to free: closing the returned socket ends it.
pub async fn into_socket(stream: TunnelStream) -> Result<std::net::TcpStream> {
    let (ours, theirs) = loopback_pair().await.map_err(|e| Error::from_io(e, "cannot create the local socket pair for a tunnel stream"))?;
    let target = stream.target().to_string();
    tokio::spawn(async move {
        if let Err(e) = stream.bridge(ours).await {
            tracing::debug!(%target, error = %e, "tunnel stream ended with an error; the local socket was reset");
        }
    });
    let theirs = theirs.into_std().map_err(|e| Error::from_io(e, "cannot detach the local socket"))?;
    theirs.set_nonblocking(false).map_err(|e| Error::from_io(e, "cannot make the local socket blocking"))?;
    Ok(theirs)
}

/// A connected pair of loopback TCP sockets, Nagle off on both: (bridge end, caller's end).
pub async fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    // The kernel completes the handshake into the listener's backlog, so connect first.
    let theirs = TcpSocket::new_v4()?.connect(listener.local_addr()?).await?;
    let mine = theirs.local_addr()?;
    for _ in 0..MAX_STRAYS {
        let (ours, from) = listener.accept().await?;
        if from == mine {
            ours.set_nodelay(true)?;
            theirs.set_nodelay(true)?;
            return Ok((ours, theirs));
        }
        // Someone else raced to our short-lived listener: drop them and keep waiting for ours.
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "other processes keep connecting to the socket pair's listener"))
}
