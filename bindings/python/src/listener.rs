//! The listener face: a registered `libtunnel::Listener` behind blocking and async methods.
//! Accepted streams come back as [`Socket`]s with the peer's details; `expose` hands the whole
//! listener to the core's `forward::expose` (what `tunnel listen` runs).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libtunnel::client::{ClientOptions, ListenerOptions, Proxy};
use libtunnel::{Error, ErrorCode};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::handles::{Background, Socket};
use crate::{awaitable, seconds, wait};

/// `(socket, client address, "dial" | "http" | "tcp", port, e2e, dialer name)`.
type Accepted = (Socket, String, &'static str, u16, bool, Option<String>);

/// A name registered with a relay.
#[pyclass(module = "libtunnel._native", frozen)]
pub(crate) struct Listener {
    /// Shared with pending `accept` futures; `None` once `expose` took the listener.
    inner: Mutex<Option<Arc<libtunnel::Listener>>>,
    /// The registered name (kept after `expose` took the listener).
    name: String,
}

async fn accept_socket(listener: Arc<libtunnel::Listener>, limit: Option<Duration>) -> libtunnel::Result<Accepted> {
    let work = async {
        let (stream, peer) = listener.accept().await?;
        let sock = libtunnel::fd::into_socket(stream).await?;
        Ok::<_, Error>((Socket::new(sock), peer.client, peer.via.as_str(), peer.port, peer.e2e, peer.dialer_name))
    };
    match limit {
        None => work.await,
        Some(l) => tokio::time::timeout(l, work)
            .await
            .map_err(|_| Error::new(ErrorCode::Timeout, format!("no connection arrived within {:.1}s", l.as_secs_f64())))?,
    }
}

impl Listener {
    fn get(&self) -> PyResult<Arc<libtunnel::Listener>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| to_py(Error::new(ErrorCode::Closed, "the listener is serving a local service (expose) and cannot accept")))
    }
}

/// `Listener.bind`'s options, a dict with every key (the Python layer fills it from its keyword
/// arguments): the core's `ListenerOptions` field by field. What is `None` comes from the
/// `TUNNEL_*` variables (`TUNNEL_RELAY`, `TUNNEL_LISTENER_KEY`, `TUNNEL_CA`, `TUNNEL_TIMEOUT`).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct BindOptions {
    relay: Option<String>,
    key: Option<String>,
    ca: Option<PathBuf>,
    timeout: Option<f64>,
    name: Option<String>,
    tcp_port: bool,
    pool: bool,
    h2c: bool,
    tls_passthrough: bool,
    backlog: Option<usize>,
    exit: Option<String>,
    exit_only: bool,
    e2e: bool,
    allow_peers: Vec<String>,
    proxy: Option<String>,
}

fn builder(o: BindOptions) -> PyResult<libtunnel::ListenerBuilder> {
    let proxy = o.proxy.as_deref().map(Proxy::parse).transpose().map_err(to_py)?;
    ListenerOptions {
        client: ClientOptions { relay: o.relay, key: o.key, ca: o.ca, timeout: o.timeout, proxy, ..ClientOptions::default() },
        name: o.name,
        tcp_port: o.tcp_port,
        pool: o.pool,
        h2c: o.h2c,
        tls_passthrough: o.tls_passthrough,
        backlog: o.backlog,
        exit: o.exit,
        exit_only: o.exit_only,
        e2e: o.e2e,
        allow_peers: o.allow_peers,
    }
    .builder()
    .map_err(to_py)
}

async fn bind(b: libtunnel::ListenerBuilder) -> libtunnel::Result<Listener> {
    let l = b.bind().await?;
    Ok(Listener { name: l.name(), inner: Mutex::new(Some(Arc::new(l))) })
}

#[pymethods]
impl Listener {
    /// Connect to the relay and register (see [`BindOptions`]).
    #[staticmethod]
    fn bind(py: Python<'_>, options: BindOptions) -> PyResult<Listener> {
        let b = builder(options)?;
        wait(py, bind(b))
    }

    #[staticmethod]
    fn bind_async(py: Python<'_>, options: BindOptions) -> PyResult<Bound<'_, PyAny>> {
        let b = builder(options)?;
        awaitable(py, bind(b))
    }

    /// The registered name (dial it as `NAME:0`).
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// `(name, http_url, tcp_addr)` as granted by the relay (the latest registration).
    #[getter]
    fn registration(&self) -> PyResult<(String, Option<String>, Option<String>)> {
        let r = self.get()?.registration();
        Ok((r.name, r.http_url, r.tcp_addr))
    }

    /// Whether a session to the relay is up right now.
    #[getter]
    fn connected(&self) -> bool {
        self.get().is_ok_and(|l| l.is_connected())
    }

    /// Wait for the next stream: `(socket, client, via, port, e2e, dialer name)`.
    #[pyo3(signature = (timeout = None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Accepted> {
        let (l, limit) = (self.get()?, seconds("timeout", timeout)?);
        wait(py, accept_socket(l, limit))
    }

    #[pyo3(signature = (timeout = None))]
    fn accept_async<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let (l, limit) = (self.get()?, seconds("timeout", timeout)?);
        awaitable(py, accept_socket(l, limit))
    }

    /// Connect every stream to the local service at `to` in the background (`tunnel listen`).
    /// Takes the listener over: `accept` fails afterwards, and closing the task unregisters.
    #[pyo3(signature = (to, *, proxy_protocol = false))]
    fn expose(&self, to: String, proxy_protocol: bool) -> PyResult<Background> {
        let mut slot = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let shared = slot.take().ok_or_else(|| to_py(Error::new(ErrorCode::Closed, "the listener is already exposing a service")))?;
        match Arc::try_unwrap(shared) {
            Ok(l) => Ok(Background::spawn(None, move |stop| libtunnel::forward::expose(l, to, proxy_protocol, stop))),
            Err(shared) => {
                *slot = Some(shared);
                Err(to_py(Error::new(ErrorCode::InvalidArgument, "cannot expose while an accept() is waiting on this listener")))
            }
        }
    }

    /// Leave a pool's rotation: the relay sends nothing new at once, queued connections are
    /// still handed out, accepted ones keep running (close once they are done).
    fn retire(&self) {
        if let Some(l) = self.inner.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            l.retire();
        }
    }

    /// An exit listener's counters: `(connected, not_allowed, failed, bytes_to_targets,
    /// bytes_from_targets)`, or `None` for other listeners (and once `expose` took it).
    #[getter]
    fn exit_stats(&self) -> Option<(u64, u64, u64, u64, u64)> {
        let l = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        l.exit_stats().map(|s| (s.connected, s.not_allowed, s.failed, s.bytes_to_targets, s.bytes_from_targets))
    }

    /// Call `callback(name, detail)` on every connection-state event from now on (see
    /// `events::watch`); the calls end after `close()`.
    fn watch(&self, callback: Py<PyAny>) -> PyResult<crate::events::Watch> {
        Ok(crate::events::watch(self.get()?.events(), callback))
    }

    /// Unregister; pending and later `accept` calls fail with `CLOSED`.
    fn close(&self) {
        if let Some(l) = self.inner.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            l.close();
        }
    }
}
