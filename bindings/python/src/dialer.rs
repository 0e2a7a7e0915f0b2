//! The dialer face: one `libtunnel::Dialer` (a multiplexed session shared by all dials, rebuilt
//! when it dies) behind blocking and async methods. Dials come back as [`Socket`]s; forwards as
//! [`Background`] tasks serving a local `127.0.0.1` port.

use std::path::PathBuf;
use std::time::Duration;

use libtunnel::client::{ClientOptions, DialerOptions, Proxy};
use libtunnel::dialer::route;
use libtunnel::{Error, ErrorCode, Mode};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::events::Watch;
use crate::handles::{Background, Socket};
use crate::{awaitable, seconds, wait};

/// A client of one relay.
#[pyclass(module = "libtunnel._native", frozen)]
pub(crate) struct Dialer {
    /// Cheap to clone (an `Arc` inside); each call clones it into its future.
    inner: libtunnel::Dialer,
}

/// Dial (through the exit listener `via` when given) and bridge the stream to a local socket,
/// within `limit` when given.
async fn dial_socket(dialer: libtunnel::Dialer, target: String, limit: Option<Duration>, via: Option<String>) -> libtunnel::Result<Socket> {
    let work = async {
        let stream = dialer.dial_target(&route(&target, via.as_deref())?).await?;
        libtunnel::fd::into_socket(stream).await
    };
    let sock = match limit {
        None => work.await?,
        Some(l) => tokio::time::timeout(l, work).await.map_err(|_| {
            Error::new(ErrorCode::Timeout, format!("dialing {target} took longer than {:.1}s; is the relay reachable?", l.as_secs_f64()))
        })??,
    };
    Ok(Socket::new(sock))
}

/// Bind `local`, make sure the relay accepts our key, and serve the port in the background.
async fn start_forward(dialer: libtunnel::Dialer, target: String, local: String, via: Option<String>) -> libtunnel::Result<Background> {
    let target = route(&target, via.as_deref())?;
    let listener = libtunnel::forward::bind_local(&local).await?;
    let addr = listener.local_addr().map_err(|e| Error::from_io(e, "reading the forward's local address"))?;
    if dialer.mode() == Mode::Multiplexed {
        dialer.connect().await?;
    }
    tracing::debug!(%addr, %target, relay = dialer.relay(), "forwarding");
    Ok(Background::spawn(Some(addr), move |stop| libtunnel::forward::forward(listener, dialer, target, stop)))
}

#[pymethods]
impl Dialer {
    /// A dialer from explicit values; what is `None` comes from the `TUNNEL_*` variables.
    #[new]
    #[pyo3(signature = (relay = None, key = None, *, timeout = None, ca = None, classic = None, e2e = false, e2e_pins = Vec::new(), e2e_identity = None, proxy = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        relay: Option<String>,
        key: Option<String>,
        timeout: Option<f64>,
        ca: Option<PathBuf>,
        classic: Option<bool>,
        e2e: bool,
        e2e_pins: Vec<(String, String)>,
        e2e_identity: Option<String>,
        proxy: Option<String>,
    ) -> PyResult<Self> {
        let options = DialerOptions {
            client: ClientOptions {
                relay,
                key,
                ca,
                timeout,
                mode: classic.map(|c| if c { Mode::Classic } else { Mode::Multiplexed }),
                proxy: proxy.as_deref().map(Proxy::parse).transpose().map_err(to_py)?,
                ..ClientOptions::default()
            },
            via: None,
            e2e,
            e2e_pins: e2e_pins.iter().map(|(name, key)| format!("{name}={key}")).collect(),
            e2e_identity,
        };
        Ok(Dialer { inner: options.dialer().map_err(to_py)? })
    }

    /// The relay URL.
    #[getter]
    fn relay(&self) -> String {
        self.inner.relay().to_string()
    }

    /// Establish the shared session now (fails early on a wrong key or an unreachable relay).
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        wait(py, self.inner.connect())
    }

    fn connect_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let d = self.inner.clone();
        awaitable(py, async move { d.connect().await })
    }

    /// Open a stream to `target` (`host:port`), through the exit listener `via` when given;
    /// returns the socket to wrap.
    #[pyo3(signature = (target, timeout = None, via = None))]
    fn dial(&self, py: Python<'_>, target: String, timeout: Option<f64>, via: Option<String>) -> PyResult<Socket> {
        let limit = seconds("timeout", timeout)?;
        wait(py, dial_socket(self.inner.clone(), target, limit, via))
    }

    #[pyo3(signature = (target, timeout = None, via = None))]
    fn dial_async<'py>(&self, py: Python<'py>, target: String, timeout: Option<f64>, via: Option<String>) -> PyResult<Bound<'py, PyAny>> {
        let limit = seconds("timeout", timeout)?;
        awaitable(py, dial_socket(self.inner.clone(), target, limit, via))
    }

    /// Serve a local port (`local`, default any free port on 127.0.0.1) whose every connection
    /// becomes a stream to `target` (through the exit listener `via` when given).
    #[pyo3(signature = (target, local = "127.0.0.1:0".to_string(), via = None))]
    fn forward(&self, py: Python<'_>, target: String, local: String, via: Option<String>) -> PyResult<Background> {
        wait(py, start_forward(self.inner.clone(), target, local, via))
    }

    #[pyo3(signature = (target, local = "127.0.0.1:0".to_string(), via = None))]
    fn forward_async<'py>(&self, py: Python<'py>, target: String, local: String, via: Option<String>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, start_forward(self.inner.clone(), target, local, via))
    }

    /// Call `callback(name, detail)` on every connection-state event from now on (see
    /// `events::watch`) until the returned watch is stopped or dropped.
    fn watch(&self, callback: Py<PyAny>) -> Watch {
        crate::events::watch(self.inner.events(), callback)
    }

    /// Close the shared session (open streams on it fail).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let d = self.inner.clone();
        wait(py, async move {
            d.close().await;
            Ok(())
        })
    }

    fn close_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let d = self.inner.clone();
        awaitable(py, async move {
            d.close().await;
            Ok(())
        })
    }
}
