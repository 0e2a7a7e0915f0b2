//! The embedded relay: a `libtunnel::Server` bound from the same settings as `tunnel server`
//! (names of `libtunnel::config::SETTINGS`), running on the runtime until shut down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use libtunnel::{RelayConfig, Server, ServerHandle};
use pyo3::prelude::*;

use crate::{awaitable, wait};

/// A running relay (`Server` in Python, as in every face).
#[pyclass(module = "libtunnel._native", name = "Server", frozen)]
pub(crate) struct Relay {
    /// Taken by `shutdown`; `abort` works through a shared reference.
    handle: Mutex<Option<ServerHandle>>,
    url: String,
    addr: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    ready_text: String,
}

fn pair(a: Option<SocketAddr>) -> Option<(String, u16)> {
    a.map(|a| (a.ip().to_string(), a.port()))
}

/// The core's embedded-relay loader (`RelayConfig::from_settings`): `settings` win over the
/// environment and `./.env` (read only when `use_env`), which win over the TOML `config_file`.
fn config(settings: Vec<(String, String)>, config_file: Option<PathBuf>, use_env: bool) -> libtunnel::Result<RelayConfig> {
    RelayConfig::from_settings(&settings, config_file.as_deref(), use_env)
}

async fn start(cfg: libtunnel::Result<RelayConfig>) -> libtunnel::Result<Relay> {
    let server = Server::bind(cfg?).await?;
    let (url, addr, tcp_addr, http_addr, ready_text) =
        (server.url(), server.local_addr(), server.tcp_addr(), server.http_addr(), server.ready_lines());
    let https_addr = server.https_addr();
    tracing::info!(%url, "relay listening");
    Ok(Relay { handle: Mutex::new(Some(server.spawn())), url, addr, tcp_addr, http_addr, https_addr, ready_text })
}

impl Relay {
    fn take(&self) -> Option<ServerHandle> {
        self.handle.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

async fn stop(handle: Option<ServerHandle>) -> libtunnel::Result<()> {
    match handle {
        Some(h) => h.shutdown().await,
        None => Ok(()),
    }
}

#[pymethods]
impl Relay {
    /// Bind and start a relay from `(setting, value)` pairs.
    #[staticmethod]
    #[pyo3(signature = (settings, config_file = None, use_env = true))]
    fn start(py: Python<'_>, settings: Vec<(String, String)>, config_file: Option<PathBuf>, use_env: bool) -> PyResult<Relay> {
        wait(py, start(config(settings, config_file, use_env)))
    }

    #[staticmethod]
    #[pyo3(signature = (settings, config_file = None, use_env = true))]
    fn start_async(py: Python<'_>, settings: Vec<(String, String)>, config_file: Option<PathBuf>, use_env: bool) -> PyResult<Bound<'_, PyAny>> {
        awaitable(py, start(config(settings, config_file, use_env)))
    }

    /// The URL dialers and listeners use (`ws://…`, `wss://…` or `tcp://…`).
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// What `tunnel server` prints when it is up (the URL and every endpoint's address).
    #[getter]
    fn ready_text(&self) -> String {
        self.ready_text.clone()
    }

    /// `(host, port)` of the WebSocket endpoint.
    #[getter]
    fn address(&self) -> Option<(String, u16)> {
        pair(self.addr)
    }

    /// `(host, port)` of the raw-TCP endpoint.
    #[getter]
    fn tcp_address(&self) -> Option<(String, u16)> {
        pair(self.tcp_addr)
    }

    /// `(host, port)` of the public HTTP port (Host routing to listeners).
    #[getter]
    fn http_address(&self) -> Option<(String, u16)> {
        pair(self.http_addr)
    }

    /// `(host, port)` of the public HTTPS port (TLS, h2, TLS passthrough by SNI).
    #[getter]
    fn https_address(&self) -> Option<(String, u16)> {
        pair(self.https_addr)
    }

    /// Stop accepting, let open streams drain (`drain_timeout`), and return when done.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        wait(py, stop(self.take()))
    }

    fn shutdown_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, stop(self.take()))
    }

    /// Stop at once, dropping every connection (like a crash).
    fn abort(&self) {
        if let Some(h) = self.take() {
            h.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(h) = self.take() {
            h.abort();
        }
    }
}
