//! `NativeDialer`: one multiplexed session to the relay shared by every dial (or classic mode),
//! handing each stream to JS as a socket fd; and `NativeForward`, a local port forward or SOCKS5
//! proxy served by the core's `forward` module on the runtime.

use std::sync::Mutex;

use libtunnel::client::{ClientOptions, Proxy};
use libtunnel::dialer::route;
use libtunnel::{Dialer, Error, ErrorCode, Mode};
use napi::{Env, JsFunction, JsObject};
use napi_derive::napi;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::events::{NativeDial, NativeWatch};
use crate::{millis, promise, sync};

/// Options of `new NativeDialer(relay, key, options)`: the core's `client::DialerOptions`.
#[napi(object)]
#[derive(Default)]
pub struct DialerOptions {
    /// Milliseconds one dial (including connecting the session) may take (core default: 20 s).
    pub timeout_ms: Option<f64>,
    /// PEM file of CA certificates to trust for `wss://`, `grpcs://` and `quic://` (default: the public Web PKI).
    pub ca: Option<String>,
    /// Speak Emissary's classic protocol (one WebSocket per connection, no half-close).
    pub classic: Option<bool>,
    /// End-to-end encryption of dials to listener names (TLS 1.3 inside the stream, the
    /// listener's key checked against the name).
    #[napi(js_name = "e2e")]
    pub e2e: Option<bool>,
    /// With `e2e`: chosen names pinned to their listener's key (base64 or key-derived name).
    #[napi(js_name = "e2ePins")]
    pub e2e_pins: Option<std::collections::HashMap<String, String>>,
    /// With `e2e`: this dialer's Ed25519 key (PEM text or file), for listeners with `allowPeers`.
    #[napi(js_name = "e2eIdentity")]
    pub e2e_identity: Option<String>,
    /// Upstream proxy to reach the relay through: `http://user:pass@host:port`, `https://…`,
    /// `socks5://…`, or `none` (default: `TUNNEL_PROXY`, else `HTTPS_PROXY`/`HTTP_PROXY`/
    /// `ALL_PROXY` with `NO_PROXY`, as curl).
    pub proxy: Option<String>,
}

/// A dialer. Cloning the core `Dialer` shares its session, so exports clone it into futures.
#[napi]
pub struct NativeDialer {
    /// The core dialer; its session is opened on first use and reconnected when it dies.
    inner: Dialer,
}

#[napi]
impl NativeDialer {
    /// Build a dialer (no I/O yet). `key` is `KID:BASE64` or a file holding it; what is not
    /// given comes from `TUNNEL_RELAY`, `TUNNEL_KEY`, `TUNNEL_CA`, `TUNNEL_TIMEOUT`, `TUNNEL_MODE`.
    #[napi(constructor, catch_unwind)]
    pub fn new(env: Env, relay: Option<String>, key: Option<String>, options: Option<DialerOptions>) -> napi::Result<Self> {
        let build = || -> libtunnel::Result<Dialer> {
            let o = options.unwrap_or_default();
            let timeout = o.timeout_ms.map(|ms| millis("timeout", ms).map(|d| d.as_secs_f64())).transpose()?;
            libtunnel::client::DialerOptions {
                client: ClientOptions {
                    relay,
                    key,
                    ca: o.ca.map(Into::into),
                    timeout,
                    mode: o.classic.map(|c| if c { Mode::Classic } else { Mode::Multiplexed }),
                    proxy: o.proxy.as_deref().map(Proxy::parse).transpose()?,
                    ..ClientOptions::default()
                },
                via: None,
                e2e: o.e2e.unwrap_or(false),
                e2e_pins: o.e2e_pins.unwrap_or_default().into_iter().map(|(name, key)| format!("{name}={key}")).collect(),
                e2e_identity: o.e2e_identity,
            }
            .dialer()
        };
        Ok(NativeDialer { inner: sync(&env, build())? })
    }

    /// The relay URL.
    #[napi(getter)]
    pub fn relay(&self) -> String {
        self.inner.relay().to_string()
    }

    /// Open and authenticate the session now (multiplexed mode), so bad keys or an unreachable
    /// relay fail here rather than on the first dial.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect(&self, env: Env) -> napi::Result<JsObject> {
        let d = self.inner.clone();
        promise(&env, async move {
            if d.mode() == Mode::Multiplexed {
                d.connect().await?;
            }
            Ok(())
        })
    }

    /// Start dialing `host:port` (or a listener's `NAME:0`), through the exit listener `via`
    /// when given: the dial's `result()` resolves to the fd of a connected loopback TCP socket
    /// bridged to the stream (the caller owns it), and its `cancel()` aborts it.
    #[napi]
    pub fn dial(&self, target: String, via: Option<String>) -> NativeDial {
        let d = self.inner.clone();
        NativeDial::start(async move { d.dial_target(&route(&target, via.as_deref())?).await })
    }

    /// Call `callback(name, detail)` on every connection-state event from now on (see
    /// `events::watch`) until the returned watch is stopped.
    #[napi(ts_args_type = "callback: (name: string, detail: any) => void")]
    pub fn watch(&self, env: Env, callback: JsFunction) -> napi::Result<NativeWatch> {
        crate::events::watch(&env, self.inner.events(), callback)
    }

    /// Forward every connection to `local` (default `127.0.0.1:0`) to `target` through the relay
    /// (and the exit listener `via` when given).
    #[napi(ts_return_type = "Promise<NativeForward>")]
    pub fn forward(&self, env: Env, target: String, local: Option<String>, via: Option<String>) -> napi::Result<JsObject> {
        let d = self.inner.clone();
        promise(&env, async move {
            let target = route(&target, via.as_deref())?;
            NativeForward::start(local, move |l, stop| libtunnel::forward::forward(l, d, target, stop)).await
        })
    }

    /// A local SOCKS5 proxy on `local` (default `127.0.0.1:0`) tunnelling every CONNECT (each
    /// through the exit listener `via` when given).
    #[napi(ts_return_type = "Promise<NativeForward>")]
    pub fn socks(&self, env: Env, local: Option<String>, via: Option<String>) -> napi::Result<JsObject> {
        let d = self.inner.clone();
        promise(&env, async move {
            let d = match via {
                Some(v) => d.with_via(&v)?,
                None => d,
            };
            NativeForward::start(local, move |l, stop| libtunnel::forward::socks_proxy(l, d, stop)).await
        })
    }

    /// Close the session; streams on it end.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self, env: Env) -> napi::Result<JsObject> {
        let d = self.inner.clone();
        promise(&env, async move {
            d.close().await;
            Ok(())
        })
    }
}

/// A running port forward or SOCKS5 proxy.
#[napi]
pub struct NativeForward {
    /// The bound local address.
    addr: std::net::SocketAddr,
    /// Fires the serve loop's shutdown future; taken by the first `close()`.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// The serve loop; taken by the first `close()`, which waits for it (connections in flight
    /// finish first, as with `net.Server.close()`).
    task: Mutex<Option<JoinHandle<libtunnel::Result<()>>>>,
}

impl NativeForward {
    async fn start<F, Fut>(local: Option<String>, serve: F) -> libtunnel::Result<NativeForward>
    where
        F: FnOnce(tokio::net::TcpListener, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = libtunnel::Result<()>> + Send + 'static,
    {
        let l = libtunnel::forward::bind_local(local.as_deref().unwrap_or("127.0.0.1:0")).await?;
        let addr = l.local_addr().map_err(|e| Error::from_io(e, "local address of the forward"))?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            l,
            Box::pin(async move {
                let _ = rx.await;
            }),
        ));
        Ok(NativeForward { addr, stop: Mutex::new(Some(tx)), task: Mutex::new(Some(task)) })
    }
}

#[napi]
impl NativeForward {
    /// The local IP it listens on.
    #[napi(getter)]
    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// The local port it listens on.
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        u32::from(self.addr.port())
    }

    /// Stop accepting; resolves once the connections in flight have finished.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self, env: Env) -> napi::Result<JsObject> {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        promise(&env, async move {
            match task {
                Some(t) => t.await.map_err(|e| Error::new(ErrorCode::General, format!("forward task failed: {e}")))?,
                None => Ok(()),
            }
        })
    }
}
