//! `NativeListener`: a registered reverse listener whose accepted streams reach JS as socket fds
//! plus who sent them. `index.js` keeps exactly one `accept()` pending while the listener is open,
//! which is what keeps Node's event loop alive.

use std::os::fd::IntoRawFd;
use std::sync::Arc;

use libtunnel::client::{ClientOptions, Proxy};
use libtunnel::Listener;
use napi::{Env, JsFunction, JsObject};
use napi_derive::napi;

use crate::{millis, promise};

/// Options of `NativeListener.bind(relay, key, options)`: the core's `client::ListenerOptions`.
#[napi(object)]
#[derive(Default)]
pub struct ListenerOptions {
    /// Register this name instead of the key-derived one (the relay must grant it to the key).
    pub name: Option<String>,
    /// Ask the relay for a public TCP port from its `tcp_ports` range.
    pub tcp_port: Option<bool>,
    /// Milliseconds connecting and registering may take (core default: 20 s).
    pub timeout_ms: Option<f64>,
    /// Most accepted streams waiting for `accept()` (default: the core's `DEFAULT_BACKLOG`, 128);
    /// more are refused.
    pub backlog: Option<u32>,
    /// PEM file of CA certificates to trust for `wss://`, `grpcs://` and `quic://`.
    pub ca: Option<String>,
    /// Join the name's pool of replicas (every replica opts in).
    pub pool: Option<bool>,
    /// Be an exit listener with these allow rules (JSON, the relay's `allow` syntax).
    pub exit: Option<String>,
    /// With `exit`: this listener exposes no service, so streams dialed to its name are refused
    /// (`ENOTALLOWED`) instead of reaching nobody.
    pub exit_only: Option<bool>,
    /// The local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server).
    #[napi(js_name = "h2c")]
    pub h2c: Option<bool>,
    /// The relay's HTTPS port passes connections whose SNI names this listener through
    /// undecrypted (the local service terminates TLS).
    pub tls_passthrough: Option<bool>,
    /// End-to-end encryption: terminate TLS on every stream, refuse plaintext ones.
    #[napi(js_name = "e2e")]
    pub e2e: Option<bool>,
    /// With `e2e`: require dialers' keys and admit these (base64 or key-derived names).
    pub allow_peers: Option<Vec<String>>,
    /// Upstream proxy to reach the relay through: `http://user:pass@host:port`, `https://…`,
    /// `socks5://…`, or `none` (default: `TUNNEL_PROXY`, else `HTTPS_PROXY`/`HTTP_PROXY`/
    /// `ALL_PROXY` with `NO_PROXY`, as curl).
    pub proxy: Option<String>,
}

/// One accepted stream.
#[napi(object)]
pub struct Accepted {
    /// A connected loopback TCP socket bridged to the stream; the caller owns it.
    pub fd: i32,
    /// The original client's address as the relay saw it (`ip:port`).
    pub client: String,
    /// How it arrived: `dial`, `http` or `tcp`.
    pub via: String,
    /// The port label a dialer asked for (0 = default), or the public TCP port.
    pub port: u32,
    /// Whether the stream is end-to-end encrypted.
    #[napi(js_name = "e2e")]
    pub e2e: bool,
    /// The dialer's verified key-derived name (e2e with `allowPeers`).
    pub dialer_name: Option<String>,
}

/// A registered listener.
#[napi]
pub struct NativeListener {
    /// Shared with pending `accept()` futures; `close()` cancels them with `CLOSED`.
    inner: Arc<Listener>,
}

#[napi]
impl NativeListener {
    /// Connect to `relay` and register; `key` is the listener's PEM key or a path to it. What is
    /// not given comes from `TUNNEL_RELAY`, `TUNNEL_LISTENER_KEY`, `TUNNEL_CA`, `TUNNEL_TIMEOUT`.
    #[napi(ts_return_type = "Promise<NativeListener>")]
    pub fn bind(env: Env, relay: Option<String>, key: Option<String>, options: Option<ListenerOptions>) -> napi::Result<JsObject> {
        // The core's `ListenerOptions` field by field; it checks the rules between them.
        let o = options.unwrap_or_default();
        let timeout = o.timeout_ms.map(|ms| millis("timeout", ms).map(|d| d.as_secs_f64())).transpose();
        let proxy = o.proxy.as_deref().map(Proxy::parse).transpose();
        promise(&env, async move {
            let b = libtunnel::client::ListenerOptions {
                client: ClientOptions { relay, key, ca: o.ca.map(Into::into), timeout: timeout?, proxy: proxy?, ..ClientOptions::default() },
                name: o.name,
                tcp_port: o.tcp_port.unwrap_or(false),
                pool: o.pool.unwrap_or(false),
                h2c: o.h2c.unwrap_or(false),
                tls_passthrough: o.tls_passthrough.unwrap_or(false),
                backlog: o.backlog.map(|n| n as usize),
                exit: o.exit,
                exit_only: o.exit_only.unwrap_or(false),
                e2e: o.e2e.unwrap_or(false),
                allow_peers: o.allow_peers.unwrap_or_default(),
            }
            .builder()?;
            Ok(NativeListener { inner: Arc::new(b.bind().await?) })
        })
    }

    /// The registered name.
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.inner.name()
    }

    /// The public HTTP URL routed to this listener, when the relay has an HTTP port.
    #[napi(getter)]
    pub fn http_url(&self) -> Option<String> {
        self.inner.registration().http_url
    }

    /// The public TCP address, when asked for and granted.
    #[napi(getter)]
    pub fn tcp_addr(&self) -> Option<String> {
        self.inner.registration().tcp_addr
    }

    /// Whether a session to the relay is up right now.
    #[napi(getter)]
    pub fn connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// The next stream; rejects with `ECLOSED` once the listener is closed.
    #[napi(ts_return_type = "Promise<Accepted>")]
    pub fn accept(&self, env: Env) -> napi::Result<JsObject> {
        let l = self.inner.clone();
        promise(&env, async move {
            let (stream, peer) = l.accept().await?;
            let sock = libtunnel::fd::into_socket(stream).await?;
            Ok(Accepted {
                fd: sock.into_raw_fd(),
                client: peer.client,
                via: peer.via.as_str().to_string(),
                port: u32::from(peer.port),
                e2e: peer.e2e,
                dialer_name: peer.dialer_name,
            })
        })
    }

    /// Leave a pool's rotation: the relay sends nothing new at once, queued streams are still
    /// accepted, open ones keep running (close once they are done).
    #[napi]
    pub fn retire(&self) {
        self.inner.retire();
    }

    /// Call `callback(name, detail)` on every connection-state event from now on (see
    /// `events::watch`); the calls end after `close()`.
    #[napi(ts_args_type = "callback: (name: string, detail: any) => void")]
    pub fn watch(&self, env: Env, callback: JsFunction) -> napi::Result<crate::events::NativeWatch> {
        crate::events::watch(&env, self.inner.events(), callback)
    }

    /// Unregister and stop; a pending `accept()` rejects with `ECLOSED`.
    #[napi]
    pub fn close(&self) {
        self.inner.close();
    }
}
