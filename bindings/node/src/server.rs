//! `NativeServer`: an embedded relay (the core's `Server`) running on the runtime.

use std::sync::Mutex;

use libtunnel::{Error, ErrorCode, RelayConfig, Server, ServerHandle};
use napi::{Env, JsObject};
use napi_derive::napi;

use crate::promise;

/// Options of `NativeServer.start(settings, options)`.
#[napi(object)]
pub struct ServerOptions {
    /// Also read `TUNNEL_*`/`EMISSARY_*` environment variables and `./.env` (lower precedence
    /// than `settings`), as `tunnel server` does. Default false: only `settings` count.
    pub env: Option<bool>,
    /// A TOML config file (keys are the setting names), lowest precedence.
    pub config_file: Option<String>,
}

/// A running relay.
#[napi]
pub struct NativeServer {
    /// The running relay; taken by the first `close()` or `abort()`.
    handle: Mutex<Option<ServerHandle>>,
    url: String,
    addr: Option<String>,
    http_addr: Option<String>,
    tcp_addr: Option<String>,
    ready_text: String,
}

#[napi]
impl NativeServer {
    /// Validate `settings` (`[name, value]` pairs using the setting names of `tunnel server --set`),
    /// bind every endpoint and start serving.
    #[napi(ts_return_type = "Promise<NativeServer>")]
    pub fn start(env: Env, settings: Vec<Vec<String>>, options: Option<ServerOptions>) -> napi::Result<JsObject> {
        promise(&env, async move {
            let mut overrides = Vec::with_capacity(settings.len());
            for pair in settings {
                match <[String; 2]>::try_from(pair) {
                    Ok([k, v]) => overrides.push((k, v)),
                    Err(_) => return Err(Error::new(ErrorCode::InvalidArgument, "settings must be [name, value] pairs")),
                }
            }
            let (use_env, file) = options.map(|o| (o.env.unwrap_or(false), o.config_file)).unwrap_or((false, None));
            let cfg = RelayConfig::from_settings(&overrides, file.as_deref().map(AsRef::as_ref), use_env)?;
            let server = Server::bind(cfg).await?;
            let show = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string());
            let (url, addr, http_addr, tcp_addr) = (server.url(), show(server.local_addr()), show(server.http_addr()), show(server.tcp_addr()));
            let ready_text = server.ready_lines();
            Ok(NativeServer { handle: Mutex::new(Some(server.spawn())), url, addr, http_addr, tcp_addr, ready_text })
        })
    }

    /// The URL dialers and listeners use (`ws://…`, `wss://…` or `tcp://…`).
    #[napi(getter)]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// `ip:port` of the WebSocket tunnel endpoint, if enabled.
    /// What `tunnel server` prints when it is up (the URL and every endpoint's address).
    #[napi(getter)]
    pub fn ready_text(&self) -> String {
        self.ready_text.clone()
    }

    #[napi(getter)]
    pub fn address(&self) -> Option<String> {
        self.addr.clone()
    }

    /// `ip:port` of the public HTTP port, if enabled.
    #[napi(getter)]
    pub fn http_address(&self) -> Option<String> {
        self.http_addr.clone()
    }

    /// `ip:port` of the raw-TCP tunnel endpoint, if enabled.
    #[napi(getter)]
    pub fn tcp_address(&self) -> Option<String> {
        self.tcp_addr.clone()
    }

    /// Stop accepting and drain (open streams get `drain_timeout`); resolves when done.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self, env: Env) -> napi::Result<JsObject> {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        promise(&env, async move {
            match handle {
                Some(h) => h.shutdown().await,
                None => Ok(()),
            }
        })
    }

    /// Stop at once, dropping every connection (like a crash).
    #[napi]
    pub fn abort(&self) {
        if let Some(h) = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }
}
