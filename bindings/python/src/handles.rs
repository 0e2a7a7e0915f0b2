//! What the native layer hands to Python besides plain values: an owned socket (a tunnel stream
//! bridged to a loopback TCP socket by `libtunnel::fd::into_socket`) and a background task (a
//! local port forward, or a listener exposing a local service) that stops when told or dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A connected socket whose file descriptor Python has not taken yet. Closing happens on drop, so
/// a result that never reaches Python (a cancelled asyncio task) does not leak the descriptor.
#[pyclass(module = "libtunnel._native", frozen)]
pub(crate) struct Socket {
    /// `None` once `detach` gave the descriptor to Python.
    sock: Mutex<Option<std::net::TcpStream>>,
}

impl Socket {
    pub(crate) fn new(sock: std::net::TcpStream) -> Socket {
        Socket { sock: Mutex::new(Some(sock)) }
    }
}

#[pymethods]
impl Socket {
    /// Give up ownership of the file descriptor and return it (for `socket.socket(fileno=fd)`).
    fn detach(&self) -> PyResult<i32> {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner()).take();
        sock.map(IntoRawFd::into_raw_fd).ok_or_else(|| PyRuntimeError::new_err("the socket was already detached"))
    }
}

/// A task running on the runtime until `close()` or until this object is dropped: dropping the
/// stop sender resolves the task's shutdown future too.
#[pyclass(module = "libtunnel._native", frozen)]
pub(crate) struct Background {
    /// Where the task listens (a forward's local address), when it does.
    addr: Option<SocketAddr>,
    /// Taken by `close()`; sending (or dropping) it asks the task to stop accepting.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Taken by `wait()`.
    done: Mutex<Option<JoinHandle<libtunnel::Result<()>>>>,
}

impl Background {
    /// Spawn `run(shutdown)` on the runtime.
    pub(crate) fn spawn<F, Fut>(addr: Option<SocketAddr>, run: F) -> Background
    where
        F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = libtunnel::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        let done = crate::runtime().spawn(run(shutdown));
        Background { addr, stop: Mutex::new(Some(tx)), done: Mutex::new(Some(done)) }
    }
}

#[pymethods]
impl Background {
    /// `(host, port)` the task listens on, or `None`.
    #[getter]
    fn address(&self) -> Option<(String, u16)> {
        self.addr.map(|a| (a.ip().to_string(), a.port()))
    }

    /// Stop accepting new connections (those in flight finish on their own). Does not block.
    fn close(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Block until the task ends (after `close()`, or when it fails), raising its error.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(done) = done else { return Ok(()) };
        crate::wait(py, async move {
            done.await.map_err(|e| libtunnel::Error::new(libtunnel::ErrorCode::General, format!("background task failed: {e}")))?
        })
    }
}
