//! Relay configuration: typed, validated, and loaded from (lowest to highest precedence) a TOML
//! file, a `.env` file in the working directory, the process environment (`TUNNEL_*`, plus
//! Emissary's `EMISSARY_*` names), and command-line flags. Every error names the setting to fix.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Key, KeyJson, KeySet};
use crate::egress::allowlist::Allowlist;
use crate::error::{Error, Result};

/// Safety limits of the relay. Defaults suit a relay on the edge of a private network.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A client must finish the WebSocket upgrade and authentication within this time.
    pub handshake_timeout: Duration,
    /// Connecting to a target (DNS included) may take this long before reply 0x06.
    pub connect_timeout: Duration,
    /// Most streams open at once on one multiplexed session.
    pub max_streams_per_session: usize,
    /// Most transport connections open at once.
    pub max_connections: usize,
    /// On shutdown, open streams get this long to finish.
    pub drain_timeout: Duration,
    /// Ping a silent session after this long.
    pub keepalive_interval: Duration,
    /// Drop a session silent for this long.
    pub keepalive_timeout: Duration,
    /// Largest receive window one stream may grow to on a long link (bytes).
    pub max_stream_window: usize,
    /// Most window all streams of one session may have granted beyond their initial 256 KiB
    /// each (bytes): what bounds the data a session buffers for slow readers.
    pub session_receive_budget: usize,
    /// A listener must answer a public HTTP request (response headers) within this time, else 504;
    /// and a public client that takes none of a response body for this long has it reset.
    pub http_timeout: Duration,
    /// No longer limits anything: the relay streams classic WebSocket messages frame by frame, so
    /// a message of any size (Emissary's dialer sends each write as one) passes with bounded
    /// memory. Kept so configs that set it still load.
    pub classic_max_message: usize,
    /// Most multiplexed sessions open at once with one shared key (a leaked key cannot take the
    /// whole relay).
    pub max_sessions_per_key: usize,
    /// Most streams the relay has offered one listener session and not yet had accepted; more
    /// are refused at once (503 on the HTTP port, REFUSED for dialers).
    pub max_pending_accepts: usize,
    /// Largest request head (request line and headers) on the public HTTP port, in bytes.
    pub http_max_header_bytes: usize,
    /// A public HTTP client must send a request head within this time (slowloris).
    pub http_header_timeout: Duration,
    /// Failed authentications one source address may make per minute; past that its attempts
    /// are refused without being checked until the minute is over.
    pub auth_failures_per_minute: usize,
    /// Most connections one source (an IPv4 address, an IPv6 /64) may hold open, authenticated or
    /// not, on all endpoints together; at most half of `max_connections`.
    pub max_connections_per_source: usize,
    /// Most connections one source may have in their handshake (not yet authenticated; on the
    /// public HTTP port: no request head yet); at most `max_handshakes`.
    pub max_handshakes_per_source: usize,
    /// Most connections in their handshake at once, from all sources; at most half of
    /// `max_connections`, so authenticated sessions always keep the other half.
    pub max_handshakes: usize,
    /// Most public HTTP requests one source may have in progress (more: 429).
    pub http_max_requests_per_source: usize,
    /// Most public HTTP requests one listener may have in progress (more: 503).
    pub http_max_requests_per_listener: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_streams_per_session: 4096,
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            max_stream_window: 16 * 1024 * 1024,
            session_receive_budget: 64 * 1024 * 1024,
            classic_max_message: 16 * 1024 * 1024,
            http_timeout: Duration::from_secs(30),
            max_sessions_per_key: 64,
            max_pending_accepts: 2048,
            http_max_header_bytes: 64 * 1024,
            http_header_timeout: Duration::from_secs(10),
            auth_failures_per_minute: 10,
            max_connections_per_source: 1024,
            max_handshakes_per_source: 128,
            max_handshakes: 1024,
            http_max_requests_per_source: 128,
            http_max_requests_per_listener: 1024,
        }
    }
}

impl Limits {
    /// Every limit within what the relay can use: durations between 1 ms and 30 days, counts
    /// between 1 and 2^28 (a config built in code skips the loaders' checks; an out-of-range
    /// value would otherwise panic in a semaphore or a deadline computation).
    pub fn clamped(self) -> Limits {
        let d = |v: Duration| v.clamp(Duration::from_millis(1), MAX_SECONDS);
        let n = |v: usize| v.clamp(1, MAX_COUNT);
        // One source, or all handshakes together, can never take more than half the relay.
        let half = (n(self.max_connections) / 2).max(1);
        let handshakes = n(self.max_handshakes).min(half);
        Limits {
            handshake_timeout: d(self.handshake_timeout),
            connect_timeout: d(self.connect_timeout),
            max_streams_per_session: n(self.max_streams_per_session),
            max_connections: n(self.max_connections),
            drain_timeout: d(self.drain_timeout),
            keepalive_interval: d(self.keepalive_interval),
            keepalive_timeout: d(self.keepalive_timeout),
            max_stream_window: self.max_stream_window.clamp(256 * 1024, 1 << 30),
            session_receive_budget: n(self.session_receive_budget),
            http_timeout: d(self.http_timeout),
            classic_max_message: n(self.classic_max_message),
            max_sessions_per_key: n(self.max_sessions_per_key),
            max_pending_accepts: n(self.max_pending_accepts),
            http_max_header_bytes: self.http_max_header_bytes.clamp(8192, MAX_COUNT),
            http_header_timeout: d(self.http_header_timeout),
            auth_failures_per_minute: n(self.auth_failures_per_minute),
            max_connections_per_source: n(self.max_connections_per_source).min(half),
            max_handshakes_per_source: n(self.max_handshakes_per_source).min(handshakes),
            max_handshakes: handshakes,
            http_max_requests_per_source: n(self.http_max_requests_per_source),
            http_max_requests_per_listener: n(self.http_max_requests_per_listener),
        }
    }
}

/// Largest duration setting (30 days): deadlines are computed as `now + setting`.
const MAX_SECONDS: Duration = Duration::from_secs(crate::client::config::MAX_SECONDS as u64);
/// Largest count setting: below tokio's semaphore limit on 32- and 64-bit targets.
const MAX_COUNT: usize = 1 << 28;

/// A chosen-name grant for a listener key (`TUNNEL_LISTENER_KEYS`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerGrant {
    /// The listener's Ed25519 public key (base64).
    pub public_key: String,
    /// Names this key may register besides its key-derived name.
    #[serde(default)]
    pub names: Vec<String>,
}

/// Which dialer keys may reach targets through an exit listener (`TUNNEL_EXITS`). An exit
/// listed nowhere can be used by no dialer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExitGrant {
    /// The exit listener's name.
    pub name: String,
    /// Key ids (of `auth_keys`) whose sessions may dial `via` this exit.
    pub key_ids: Vec<u32>,
}

/// Several relays serving one namespace (`relay::cluster`): listener names are claimed in Redis,
/// and a stream for a name another node holds is forwarded to it over one node-to-node session.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The Redis URL (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS,
    /// `unix:///path`, or `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER[?db=N]`).
    pub redis: String,
    /// PEM CA certificates to trust for `rediss://` (default: the system's roots and the Web PKI).
    pub redis_ca: Option<PathBuf>,
    /// The shared key node-to-node sessions authenticate with (the same on every node).
    pub key: Key,
    /// The URL other nodes dial to reach this one (`tcp://` or `ws://`); derived from
    /// `tcp_listen` (else `listen`) when unset, which needs a specific IP, not 0.0.0.0.
    pub advertise: Option<String>,
    /// How long a claim outlives its node: a node that dies loses its names this long after its
    /// last refresh (refreshed every third of it).
    pub claim_ttl: Duration,
    /// Prefix of every Redis key and channel, so several clusters can share one Redis.
    pub namespace: String,
}

impl ClusterConfig {
    /// The Redis URL with any password replaced by `***` (for logs and the admin API).
    pub fn redacted_redis(&self) -> String {
        match url::Url::parse(&self.redis) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            // `redis+sentinel://user:pw@h:1,h:2/m` is no URL the parser takes: cut the password out.
            _ => match self.redis.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.split_once('@')?))) {
                Some((scheme, (user, rest))) if user.contains(':') => format!("{scheme}://{}:***@{rest}", user.split(':').next().unwrap_or("")),
                _ => self.redis.clone(),
            },
        }
    }
}

/// Everything the relay needs to run.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// WebSocket tunnel endpoint (TLS when a certificate is set); `None` disables it.
    pub listen: Option<SocketAddr>,
    /// Raw-TCP tunnel endpoint.
    pub tcp_listen: Option<SocketAddr>,
    /// Public HTTP port routing by `Host` to listeners.
    pub http_listen: Option<SocketAddr>,
    /// Domain under which listener names are served.
    pub domain: String,
    /// Accepted shared-secret keys.
    pub auth_keys: KeySet,
    /// Targets dialers may reach.
    pub allow: Allowlist,
    /// Listener keys the relay accepts, with the chosen names each may register.
    pub listener_keys: Vec<ListenerGrant>,
    /// Let any Ed25519 key register its key-derived name (chosen names still need a grant).
    pub listeners_open: bool,
    /// Exit listeners and the dialer keys that may use each (`via`); none by default.
    pub exits: Vec<ExitGrant>,
    /// Public TCP ports the relay may assign to listeners (inclusive range), bound on
    /// `tcp_ports_bind`.
    pub tcp_ports: Option<(u16, u16)>,
    /// Address the public TCP ports bind on.
    pub tcp_ports_bind: IpAddr,
    /// PEM certificate chain for `wss://`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `wss://`.
    pub tls_key: Option<PathBuf>,
    /// Health path (GET answers 200 with the key ids).
    pub health_path: String,
    /// The admin endpoint (`relay::admin`), off when `None`.
    pub admin_listen: Option<SocketAddr>,
    /// The bearer token the admin endpoint requires (at least 16 characters).
    pub admin_token: Option<String>,
    /// DNS servers for resolving targets, tried in order (port 53 unless given); the system
    /// resolver when empty, and as the fallback when none of them answers (Emissary's rule).
    pub dns_servers: Vec<SocketAddr>,
    /// Safety limits.
    pub limits: Limits,
    /// Public HTTPS port (TLS with `public_tls_cert`, ALPN `h2` and `http/1.1`, SNI passthrough
    /// for listeners that terminate TLS themselves); `None` disables it.
    pub https_listen: Option<SocketAddr>,
    /// PEM certificate chains for the public HTTPS port (a wildcard `*.<domain>`, or several
    /// chosen by SNI); paired in order with `public_tls_key`. Reloaded on SIGHUP.
    pub public_tls_cert: Vec<PathBuf>,
    /// PEM private keys, one per `public_tls_cert`.
    pub public_tls_key: Vec<PathBuf>,
    /// Path routing for clients that cannot set `Host`: with `/t`, a request for
    /// `<domain>/t/NAME/x` reaches the listener `NAME` as `/x`. `None` (the default) turns it off.
    pub http_path_prefix: Option<String>,
    /// Requests each listener may receive per window on the public ports (`(count, window)`;
    /// more get 429 with `Retry-After`); `None` (the default) sets no rate.
    pub http_listener_rate: Option<(u64, Duration)>,
    /// The Redis cluster this relay is a node of; `None` (the default): a relay on its own.
    pub cluster: Option<ClusterConfig>,
    /// Load balancers (IPs or CIDRs) whose connections start with a PROXY protocol header naming
    /// the real client (`relay::proxy_header`); none by default.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl RelayConfig {
    /// A config with these keys and rules and defaults elsewhere, listening on `127.0.0.1:0` (for
    /// embedding and tests).
    pub fn new(auth_keys: KeySet, allow: Allowlist) -> RelayConfig {
        RelayConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            tcp_listen: None,
            http_listen: None,
            domain: "localhost".into(),
            auth_keys,
            allow,
            listener_keys: Vec::new(),
            listeners_open: false,
            exits: Vec::new(),
            tcp_ports: None,
            tcp_ports_bind: IpAddr::from([127, 0, 0, 1]),
            tls_cert: None,
            tls_key: None,
            health_path: "/healthz".into(),
            admin_listen: None,
            admin_token: None,
            dns_servers: Vec::new(),
            limits: Limits::default(),
            https_listen: None,
            public_tls_cert: Vec::new(),
            public_tls_key: Vec::new(),
            http_path_prefix: None,
            http_listener_rate: None,
            cluster: None,
            proxy_protocol_from: Vec::new(),
        }
    }

    /// Load from the process environment, `./.env`, an optional TOML file and flag overrides
    /// (`(setting, value)` pairs using the lower-case names of [`SETTINGS`]).
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<RelayConfig> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let dotenv = read_dotenv(Path::new(".env"))?;
        let toml = match file {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::config(format!("cannot read config file {}: {e}", p.display())))?),
            None => None,
        };
        RelayConfig::from_sources(toml.as_deref(), &dotenv, &env, overrides)
    }

    /// A relay must serve dialers (`auth_keys`) or listeners (`listener_keys` or
    /// `listeners_open`), or both: a listeners-only relay (public HTTP, ngrok-style) needs no
    /// shared key and no allowlist. A relay for dialers alone needs an allowlist (else no dial
    /// could succeed); with listeners too, an empty one lets dialers reach listeners by name only,
    /// which is worth a warning. `keys_var` and `allow_var` name the settings in the errors.
    pub fn check_serves_someone(&self, keys_var: &str, allow_var: &str) -> Result<()> {
        let listeners = !self.listener_keys.is_empty() || self.listeners_open;
        if self.auth_keys.is_empty() && !listeners {
            return Err(Error::config(format!(
                "no auth keys and no listener keys: the relay would serve nobody; set {keys_var} to a JSON list like \
                 [{{\"kid\": 1, \"data\": \"<base64>\"}}] for dialers (`tunnel keygen` makes one), and/or TUNNEL_LISTENER_KEYS \
                 (or TUNNEL_LISTENERS_OPEN=true) for listeners"
            )));
        }
        if !self.auth_keys.is_empty() && self.allow.is_empty() {
            if !listeners {
                return Err(Error::config(format!(
                    "the allowlist is empty, so no dial could succeed: set {allow_var} to a JSON list like [{{\"host\": \"db.internal\", \"port\": 5432}}]"
                )));
            }
            tracing::warn!("the allowlist is empty: dialers can reach listeners by name only; set {allow_var} to let them reach targets");
        }
        Ok(())
    }

    /// An admin endpoint needs a token of at least 16 characters (it shows who is connected).
    pub fn check_admin(&self) -> Result<()> {
        match (&self.admin_listen, &self.admin_token) {
            (Some(_), None) => Err(Error::config(
                "admin_listen is set but admin_token is not: set TUNNEL_ADMIN_TOKEN to a secret of at least 16 characters (e.g. `openssl rand -hex 24`)",
            )),
            (Some(_), Some(t)) if t.len() < 16 => {
                Err(Error::config("TUNNEL_ADMIN_TOKEN must be at least 16 characters (e.g. `openssl rand -hex 24`)"))
            }
            _ => Ok(()),
        }
    }

    /// The embedded relay's loader (Python `Relay`, Node `Server.start`, C `tunnel_server_*`):
    /// `settings` (`(name, value)` pairs, names as in [`SETTINGS`], any case) win over the
    /// environment and `./.env` (read only when `use_env`), which win over the TOML `file`.
    pub fn from_settings(settings: &[(String, String)], file: Option<&Path>, use_env: bool) -> Result<RelayConfig> {
        let settings: Vec<(String, String)> = settings.iter().map(|(k, v)| (k.trim().to_ascii_lowercase(), v.clone())).collect();
        if let Some((k, _)) = settings.iter().find(|(k, _)| lookup(k).is_none()) {
            return Err(unknown(k, "setting"));
        }
        if use_env {
            return RelayConfig::load(file, &settings);
        }
        let toml = match file {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::config(format!("cannot read config file {}: {e}", p.display())))?),
            None => None,
        };
        RelayConfig::from_sources(toml.as_deref(), &[], &[], &settings)
    }

    /// Merge explicit sources (what `load` reads), lowest precedence first.
    pub fn from_sources(
        toml: Option<&str>,
        dotenv: &[(String, String)],
        env: &[(String, String)],
        overrides: &[(String, String)],
    ) -> Result<RelayConfig> {
        let mut values: BTreeMap<&'static str, (String, String)> = BTreeMap::new(); // key -> (value, where)
        if let Some(text) = toml {
            let table: toml::Table = text.parse().map_err(|e| Error::config(format!("config file is not valid TOML: {e}")))?;
            for (k, v) in table {
                let setting = lookup(&k).ok_or_else(|| unknown(&k, "config file key"))?;
                let s = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    other => serde_json::to_string(&other).expect("TOML values serialise as JSON"),
                };
                values.insert(setting.name, (s, format!("config file key {k}")));
            }
        }
        // .env never overrides the real environment (godotenv's rule, which Emissary follows).
        let mut merged: BTreeMap<String, String> = dotenv.iter().cloned().collect();
        merged.extend(env.iter().cloned());
        let mut emissary_used = false;
        let mut listen_given = false;
        for (var, val) in &merged {
            if let Some(name) = var.strip_prefix("TUNNEL_") {
                if crate::client::config::is_client_var(var) {
                    continue;
                }
                let setting = lookup(&name.to_ascii_lowercase()).ok_or_else(|| unknown(var, "environment variable"))?;
                listen_given |= setting.name == "listen";
                values.insert(setting.name, (val.clone(), var.clone()));
            }
        }
        for (var, val) in &merged {
            if let Some(name) = var.strip_prefix("EMISSARY_") {
                let (setting, value) = match name {
                    "HTTP_PORT" => ("listen", port_to_addr(val, var)?),
                    "TCP_PORT" => ("tcp_listen", port_to_addr(val, var)?),
                    "AUTH_KEYS" => ("auth_keys", val.clone()),
                    "ALLOWED_PROXY_TARGETS" => ("allow", val.clone()),
                    "DNS_SERVERS" => ("dns_servers", val.clone()),
                    "HEALTH_PATH" => ("health_path", val.clone()),
                    // Emissary ignores names it does not know, and Kubernetes injects service
                    // links (EMISSARY_PORT, EMISSARY_SERVICE_HOST, ...) into every pod of a
                    // namespace with a Service named `emissary`.
                    _ if is_service_link(name) => continue,
                    _ => {
                        tracing::warn!(
                            "ignoring unknown environment variable {var} (Emissary ignores it too; `tunnel server --set help` lists the settings)"
                        );
                        continue;
                    }
                };
                emissary_used = true;
                if let Some((_, prev)) = values.get(setting) {
                    if prev.starts_with("TUNNEL_") {
                        return Err(Error::config(format!("both {prev} and {var} are set; set only one of them")));
                    }
                }
                listen_given |= setting == "listen";
                values.insert(lookup(setting).expect("mapped names exist").name, (value, var.clone()));
            }
        }
        if emissary_used && !listen_given && !values.contains_key("listen") {
            // Emissary's own default, so the EMISSARY_* names make a drop-in replacement.
            values.insert("listen", ("0.0.0.0:8080".into(), "Emissary's default HTTP port".into()));
        }
        for (k, v) in overrides {
            let setting = lookup(k).ok_or_else(|| unknown(k, "flag"))?;
            values.insert(setting.name, (v.clone(), format!("--{}", k.replace('_', "-"))));
        }
        RelayConfig::from_values(&values).map_err(|e| {
            // A value that .env kept with a quote at one end is the likely cause: say so.
            let msg = e.to_string();
            let hint = values.values().find_map(|(v, var)| {
                let from_dotenv = dotenv.iter().any(|(k, _)| k == var) && !env.iter().any(|(k, _)| k == var);
                (from_dotenv && msg.contains(var.as_str())).then(|| crate::dotenv::quoting_hint(var, v)).flatten()
            });
            match hint {
                Some(h) => Error::config(format!("{msg}; {h}")),
                None => e,
            }
        })
    }

    fn from_values(values: &BTreeMap<&'static str, (String, String)>) -> Result<RelayConfig> {
        let get = |k: &str| values.get(k).map(|(v, w)| (v.trim(), w.as_str()));
        let mut cfg = RelayConfig::new(KeySet::default(), Allowlist::default());
        cfg.listen = Some("127.0.0.1:7835".parse().expect("valid default"));
        if let Some((v, w)) = get("listen") {
            cfg.listen = parse_opt_addr(v, w)?;
        }
        if let Some((v, w)) = get("tcp_listen") {
            cfg.tcp_listen = parse_opt_addr(v, w)?;
        }
        if let Some((v, w)) = get("http_listen") {
            cfg.http_listen = parse_opt_addr(v, w)?;
        }
        if let Some((v, w)) = get("https_listen") {
            cfg.https_listen = parse_opt_addr(v, w)?;
        }
        let paths =
            |k: &str| get(k).map(|(v, _)| v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(PathBuf::from).collect()).unwrap_or_default();
        cfg.public_tls_cert = paths("public_tls_cert");
        cfg.public_tls_key = paths("public_tls_key");
        if cfg.public_tls_cert.len() != cfg.public_tls_key.len() {
            return Err(Error::config(format!(
                "TUNNEL_PUBLIC_TLS_CERT lists {} certificate(s) and TUNNEL_PUBLIC_TLS_KEY {} key(s); list one key per certificate, in the same order (comma separated)",
                cfg.public_tls_cert.len(),
                cfg.public_tls_key.len()
            )));
        }
        if cfg.https_listen.is_some() && cfg.public_tls_cert.is_empty() {
            return Err(Error::config(
                "TUNNEL_HTTPS_LISTEN is set but no certificate: set TUNNEL_PUBLIC_TLS_CERT and TUNNEL_PUBLIC_TLS_KEY (PEM files)",
            ));
        }
        if let Some((v, w)) = get("http_path_prefix") {
            if !matches!(v, "" | "off") {
                let p = v.trim_end_matches('/');
                if !p.starts_with('/') || p.len() < 2 || p[1..].contains('/') {
                    return Err(Error::config(format!("{w} must be one path segment like /t (or off), got {v:?}")));
                }
                cfg.http_path_prefix = Some(p.to_string());
            }
        }
        if let Some((v, w)) = get("http_listener_rate") {
            if !matches!(v, "" | "off") {
                let bad = || {
                    Error::config(format!("{w} must be REQUESTS/SECONDS like 500/300 (500 requests per 5 minutes per listener), or off; got {v:?}"))
                };
                let (n, secs) = v.split_once('/').ok_or_else(bad)?;
                let n: u64 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
                let secs: u64 = secs.trim().parse().ok().filter(|s| *s > 0 && *s <= MAX_SECONDS.as_secs()).ok_or_else(bad)?;
                cfg.http_listener_rate = Some((n, Duration::from_secs(secs)));
            }
        }
        if let Some((v, _)) = get("domain") {
            cfg.domain = v.trim_matches('.').to_ascii_lowercase();
        }
        let keys_var = values.get("auth_keys").map(|(_, w)| w.clone()).unwrap_or_else(|| "TUNNEL_AUTH_KEYS".into());
        if let Some((v, w)) = get("auth_keys") {
            let list: Vec<KeyJson> = serde_json::from_str(v).map_err(|e| {
                Error::config(format!("{w} must be a JSON list like [{{\"kid\": 1, \"data\": \"<base64>\"}}] ({e}); `tunnel keygen` prints one"))
            })?;
            let keys =
                list.iter().map(|k| Key::from_json(k).map_err(|e| Error::config(format!("{w}: {}", e.message())))).collect::<Result<Vec<_>>>()?;
            cfg.auth_keys = KeySet::new(keys).map_err(|e| Error::config(format!("{w}: {}", e.message())))?;
        }
        if let Some((v, w)) = get("allow") {
            cfg.allow = Allowlist::from_json(v, w)?;
        }
        if let Some((v, w)) = get("listener_keys") {
            cfg.listener_keys = serde_json::from_str(v)
                .map_err(|e| Error::config(format!("{w} must be a JSON list like [{{\"public_key\": \"<base64>\", \"names\": [\"api\"]}}] ({e})")))?;
        }
        if let Some((v, w)) = get("exits") {
            cfg.exits = serde_json::from_str(v)
                .map_err(|e| Error::config(format!("{w} must be a JSON list like [{{\"name\": \"corp\", \"key_ids\": [1]}}] ({e})")))?;
            if let Some(bad) = cfg.exits.iter().find(|g| !crate::identity::valid_name(&g.name)) {
                return Err(Error::config(format!(
                    "{w}: exit name {:?} is not a valid listener name; use 1-63 lowercase letters, digits and '-'",
                    bad.name
                )));
            }
        }
        cfg.tls_cert = get("tls_cert").map(|(v, _)| PathBuf::from(v));
        cfg.tls_key = get("tls_key").map(|(v, _)| PathBuf::from(v));
        if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
            return Err(Error::config("set both TUNNEL_TLS_CERT and TUNNEL_TLS_KEY (or neither)"));
        }
        if let Some((v, w)) = get("admin_listen") {
            cfg.admin_listen = parse_opt_addr(v, w)?;
        }
        if let Some((v, _)) = get("admin_token") {
            cfg.admin_token = Some(v.to_string()).filter(|t| !t.is_empty());
        }
        cfg.check_admin()?;
        if let Some((v, w)) = get("health_path") {
            if !v.starts_with('/') {
                return Err(Error::config(format!("{w} must start with '/', like /healthz")));
            }
            cfg.health_path = v.to_string();
        }
        if let Some((v, w)) = get("dns_servers") {
            cfg.dns_servers = v
                .split_whitespace()
                .map(|s| {
                    s.parse::<IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                        .or_else(|_| s.parse::<SocketAddr>())
                        .map_err(|_| Error::config(format!("{w}: {s:?} is not an IP address (list IPs, or IP:PORT, separated by spaces)")))
                })
                .collect::<Result<_>>()?;
        }
        // Bounded both ways: a duration that rounds to zero would time every handshake out, and
        // one near `Duration::MAX` would overflow the deadlines computed from it (and
        // `Duration::from_secs_f64` panics past that).
        let secs =
            |k: &str, d: Duration| -> Result<Duration> {
                match get(k) {
                    None => Ok(d),
                    // The same check as every face's timeouts (`client::checked_seconds`).
                    Some((v, w)) => v.parse::<f64>().ok().and_then(|s| crate::client::checked_seconds(w, s).ok()).ok_or_else(|| {
                        Error::config(format!("{w} must be a positive number of seconds (at most {}), got {v:?}", MAX_SECONDS.as_secs()))
                    }),
                }
            };
        // Counts size semaphores and buffers, which panic or abort past their limits.
        let count = |k: &str, d: usize| -> Result<usize> {
            match get(k) {
                None => Ok(d),
                Some((v, w)) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0 && *n <= MAX_COUNT)
                    .ok_or_else(|| Error::config(format!("{w} must be a positive whole number (at most {MAX_COUNT}), got {v:?}"))),
            }
        };
        let l = Limits::default();
        cfg.limits = Limits {
            handshake_timeout: secs("handshake_timeout", l.handshake_timeout)?,
            connect_timeout: secs("connect_timeout", l.connect_timeout)?,
            max_streams_per_session: count("max_streams", l.max_streams_per_session)?,
            max_connections: count("max_connections", l.max_connections)?,
            drain_timeout: secs("drain_timeout", l.drain_timeout)?,
            keepalive_interval: secs("keepalive_interval", l.keepalive_interval)?,
            keepalive_timeout: secs("keepalive_timeout", l.keepalive_timeout)?,
            max_stream_window: count("max_stream_window", l.max_stream_window)?,
            session_receive_budget: count("session_receive_budget", l.session_receive_budget)?,
            classic_max_message: count("classic_max_message", l.classic_max_message)?,
            http_timeout: secs("http_timeout", l.http_timeout)?,
            max_sessions_per_key: count("max_sessions_per_key", l.max_sessions_per_key)?,
            max_pending_accepts: count("max_pending_accepts", l.max_pending_accepts)?,
            http_max_header_bytes: count("http_max_header_bytes", l.http_max_header_bytes)?.max(8192),
            http_header_timeout: secs("http_header_timeout", l.http_header_timeout)?,
            auth_failures_per_minute: count("auth_failures_per_minute", l.auth_failures_per_minute)?,
            max_connections_per_source: count("max_connections_per_source", l.max_connections_per_source)?,
            max_handshakes_per_source: count("max_handshakes_per_source", l.max_handshakes_per_source)?,
            max_handshakes: count("max_handshakes", l.max_handshakes)?,
            http_max_requests_per_source: count("http_max_requests_per_source", l.http_max_requests_per_source)?,
            http_max_requests_per_listener: count("http_max_requests_per_listener", l.http_max_requests_per_listener)?,
        };
        if let Some((v, w)) = get("listeners_open") {
            cfg.listeners_open = match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(Error::config(format!("{w} must be true or false, got {v:?}"))),
            };
        }
        if let Some((v, w)) = get("tcp_ports") {
            if !matches!(v, "" | "off") {
                let bad = || Error::config(format!("{w} must be a port range like 20000-20099 (or off), got {v:?}"));
                let (a, b) = v.split_once('-').unwrap_or((v, v));
                let (a, b) = (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?);
                if a == 0 || b < a {
                    return Err(bad());
                }
                cfg.tcp_ports = Some((a, b));
            }
        }
        if let Some((v, w)) = get("tcp_ports_bind") {
            cfg.tcp_ports_bind = v.parse().map_err(|_| Error::config(format!("{w} must be an IP address like 0.0.0.0, got {v:?}")))?;
        }
        for g in &cfg.listener_keys {
            crate::identity::parse_public_key(&g.public_key).map_err(|e| Error::config(format!("listener_keys: {}", e.message())))?;
            if let Some(bad) = g.names.iter().find(|n| !crate::identity::valid_name(n)) {
                return Err(Error::config(format!("listener_keys: name {bad:?} is not valid; use 1-63 lowercase letters, digits and '-'")));
            }
        }
        cfg.cluster = cluster_from(&get, secs("cluster_ttl", Duration::from_secs(10))?)?;
        if let Some((v, w)) = get("proxy_protocol_from") {
            cfg.proxy_protocol_from = v
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty() && *s != "off")
                .map(|s| {
                    s.parse::<ipnet::IpNet>().or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from)).map_err(|_| {
                        Error::config(format!(
                            "{w}: {s:?} is not an IP address or CIDR (list the load balancers' addresses, e.g. 10.0.0.0/24 10.0.1.5)"
                        ))
                    })
                })
                .collect::<Result<_>>()?;
        }
        let allow_var = values.get("allow").map(|(_, w)| w.clone()).unwrap_or_else(|| "TUNNEL_ALLOW".into());
        cfg.check_serves_someone(&keys_var, &allow_var)?;
        if cfg.listen.is_none() && cfg.tcp_listen.is_none() {
            return Err(Error::config("both tunnel endpoints are disabled: set TUNNEL_LISTEN (or TUNNEL_TCP_LISTEN)"));
        }
        Ok(cfg)
    }
}

/// One recognised setting.
#[derive(Debug)]
pub struct Setting {
    /// Lower-case name (TOML key; `TUNNEL_` + upper-case is the env var).
    pub name: &'static str,
    /// The value in force when it is not set, as `--set help` and `relay.env.example` show it.
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// Every relay setting.
pub const SETTINGS: &[Setting] = &[
    Setting { name: "listen", default: "127.0.0.1:7835", help: "tunnel endpoint address (WebSocket; TLS when a cert is set), or off" },
    Setting { name: "tcp_listen", default: "off", help: "raw-TCP tunnel endpoint address, or off" },
    Setting { name: "http_listen", default: "off", help: "public HTTP port routing by Host to listeners, or off" },
    Setting { name: "https_listen", default: "off", help: "public HTTPS port (HTTP/1.1 and h2 by ALPN, TLS passthrough by SNI), or off" },
    Setting {
        name: "public_tls_cert",
        default: "none",
        help: "PEM certificate chain(s) for the public HTTPS port, comma separated, chosen by SNI (reloaded on SIGHUP)",
    },
    Setting { name: "public_tls_key", default: "none", help: "PEM private key(s), one per public_tls_cert, same order" },
    Setting { name: "http_path_prefix", default: "off", help: "path routing: with /t, <domain>/t/NAME/x reaches NAME as /x" },
    Setting {
        name: "http_listener_rate",
        default: "off",
        help: "public requests per listener per window as REQUESTS/SECONDS, e.g. 500/300 (then 429), or off",
    },
    Setting { name: "domain", default: "localhost", help: "domain under which listener names are served" },
    Setting { name: "auth_keys", default: "none", help: "JSON list of {kid, data} shared-secret keys" },
    Setting { name: "allow", default: "none", help: "JSON list of {host, port} allow rules" },
    Setting { name: "listener_keys", default: "none", help: "JSON list of {public_key, names}: listener keys and their chosen names" },
    Setting { name: "listeners_open", default: "false", help: "let any listener key register its key-derived name (true/false)" },
    Setting { name: "exits", default: "none", help: "JSON list of {name, key_ids}: exit listeners and the dialer key ids that may dial via each" },
    Setting { name: "tcp_ports", default: "off", help: "public TCP port range for listeners, e.g. 20000-20099, or off" },
    Setting { name: "tcp_ports_bind", default: "127.0.0.1", help: "IP the public TCP ports bind on" },
    Setting { name: "http_timeout", default: "30", help: "seconds a listener has to answer a public request (then 504), and a client to read on (then reset)" },
    Setting { name: "tls_cert", default: "off", help: "PEM certificate chain for wss://" },
    Setting { name: "tls_key", default: "off", help: "PEM private key for wss://" },
    Setting { name: "health_path", default: "/healthz", help: "health check path" },
    Setting { name: "dns_servers", default: "system resolver", help: "space-separated DNS server IPs for resolving targets" },
    Setting { name: "handshake_timeout", default: "10", help: "seconds a client has to authenticate" },
    Setting { name: "connect_timeout", default: "10", help: "seconds to connect to a target" },
    Setting { name: "max_streams", default: "4096", help: "most open streams per session" },
    Setting { name: "max_connections", default: "10000", help: "most open transport connections" },
    Setting { name: "drain_timeout", default: "30", help: "seconds open streams get to finish at shutdown" },
    Setting { name: "keepalive_interval", default: "10", help: "seconds of silence before a ping" },
    Setting { name: "keepalive_timeout", default: "20", help: "seconds of silence before a session is dropped" },
    Setting { name: "max_stream_window", default: "16777216", help: "largest receive window one stream may grow to, bytes" },
    Setting { name: "session_receive_budget", default: "67108864", help: "most window a session's streams may grow together, bytes" },
    Setting {
        name: "classic_max_message",
        default: "ignored",
        help: "ignored (classic messages of any size are streamed); accepted for old configs",
    },
    Setting { name: "max_sessions_per_key", default: "64", help: "most multiplexed sessions open at once per shared key" },
    Setting { name: "max_pending_accepts", default: "2048", help: "most streams waiting for one listener to accept them" },
    Setting { name: "http_max_header_bytes", default: "65536", help: "largest public HTTP request head in bytes (at least 8192)" },
    Setting { name: "http_header_timeout", default: "10", help: "seconds a public HTTP client has to send its request head" },
    Setting { name: "auth_failures_per_minute", default: "10", help: "failed authentications per source address per minute before it is refused" },
    Setting {
        name: "max_connections_per_source",
        default: "1024",
        help: "most open connections per source address (IPv6: per /64); at most max_connections/2",
    },
    Setting { name: "max_handshakes_per_source", default: "128", help: "most not-yet-authenticated connections per source address (IPv6: per /64)" },
    Setting { name: "max_handshakes", default: "1024", help: "most not-yet-authenticated connections in all; at most max_connections/2" },
    Setting { name: "http_max_requests_per_source", default: "128", help: "most public HTTP requests in progress per source address (then 429)" },
    Setting {
        name: "admin_listen",
        default: "off",
        help: "admin endpoint address (listeners, sessions, config, metrics as JSON; token required), or off",
    },
    Setting { name: "admin_token", default: "none", help: "bearer token the admin endpoint requires, at least 16 characters" },
    Setting { name: "http_max_requests_per_listener", default: "1024", help: "most public HTTP requests in progress per listener (then 503)" },
    Setting {
        name: "proxy_protocol_from",
        default: "none",
        help: "load balancers (IPs/CIDRs, space separated) whose connections start with a PROXY header (v1 or v2) naming the client",
    },
    Setting { name: "cluster_redis", default: "off", help: "Redis URL of the cluster this relay is a node of (redis://host:6379), or off" },
    Setting {
        name: "cluster_redis_ca",
        default: "system roots",
        help: "PEM CA file to trust for a rediss:// (TLS) cluster_redis; default: system roots",
    },
    Setting { name: "cluster_key", default: "none", help: "KID:BASE64 key every node of the cluster shares (node-to-node sessions)" },
    Setting {
        name: "cluster_advertise",
        default: "from tcp_listen, else listen",
        help: "URL other nodes reach this one at (tcp:// or ws://); default from tcp_listen, else listen",
    },
    Setting { name: "cluster_ttl", default: "10", help: "seconds a dead node's listener names stay claimed (refreshed every third of it)" },
    Setting {
        name: "cluster_namespace",
        default: "libtunnel",
        help: "prefix of the cluster's Redis keys and channel (several clusters on one Redis)",
    },
];

/// The cluster settings: all off unless `cluster_redis` is set, which then needs `cluster_key`.
fn cluster_from<'a>(get: &dyn Fn(&str) -> Option<(&'a str, &'a str)>, claim_ttl: Duration) -> Result<Option<ClusterConfig>> {
    let Some((redis, w)) = get("cluster_redis").filter(|(v, _)| !matches!(*v, "" | "off")) else {
        for k in ["cluster_key", "cluster_advertise", "cluster_namespace", "cluster_redis_ca"] {
            if let Some((_, w)) = get(k) {
                tracing::warn!("{w} is set but TUNNEL_CLUSTER_REDIS is not: this relay runs on its own");
            }
        }
        return Ok(None);
    };
    if !["redis://", "rediss://", "redis+unix://", "unix://", "redis+sentinel://"].iter().any(|p| redis.starts_with(p)) {
        return Err(Error::config(format!("{w} must be a Redis URL like redis://127.0.0.1:6379 (rediss:// for TLS, unix:///run/redis.sock, or redis+sentinel://host:26379,host:26379/MASTER)")));
    }
    let redis_ca = get("cluster_redis_ca").map(|(v, _)| PathBuf::from(v));
    if let Some(ca) = &redis_ca {
        if !redis.starts_with("rediss://") {
            return Err(Error::config("TUNNEL_CLUSTER_REDIS_CA is set but TUNNEL_CLUSTER_REDIS is not a rediss:// (TLS) URL"));
        }
        std::fs::metadata(ca).map_err(|e| Error::config(format!("TUNNEL_CLUSTER_REDIS_CA {}: {e}", ca.display())))?;
    }
    let key = match get("cluster_key") {
        Some((v, kw)) => Key::parse(v).map_err(|e| Error::config(format!("{kw}: {}", e.message())))?,
        None => {
            return Err(Error::config(
                "TUNNEL_CLUSTER_REDIS is set but TUNNEL_CLUSTER_KEY is not: give every node the same key (KID:BASE64; `tunnel keygen --cluster` prints one); nodes authenticate each other with it",
            ))
        }
    };
    let advertise = match get("cluster_advertise") {
        Some((v, aw)) => {
            crate::transport::RelayUrl::parse(v).map_err(|e| Error::config(format!("{aw}: {}", e.message())))?;
            Some(v.to_string())
        }
        None => None,
    };
    if claim_ttl < Duration::from_secs(1) {
        return Err(Error::config("TUNNEL_CLUSTER_TTL must be at least 1 second (claims are refreshed every third of it)"));
    }
    let namespace = get("cluster_namespace").map(|(v, _)| v.to_string()).unwrap_or_else(|| "libtunnel".into());
    Ok(Some(ClusterConfig { redis: redis.to_string(), redis_ca, key, advertise, claim_ttl, namespace }))
}

fn lookup(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

fn unknown(what: &str, kind: &str) -> Error {
    let bare = what.trim_start_matches("TUNNEL_").trim_start_matches("EMISSARY_").to_ascii_lowercase();
    let close = SETTINGS
        .iter()
        .min_by_key(|s| edit_distance(&bare, s.name))
        .filter(|s| edit_distance(&bare, s.name) <= 3)
        .map(|s| {
            if what.starts_with("TUNNEL_") || what.starts_with("EMISSARY_") {
                format!("; did you mean TUNNEL_{}?", s.name.to_ascii_uppercase())
            } else {
                format!("; did you mean {}?", s.name)
            }
        })
        .unwrap_or_default();
    Error::config(format!("unknown {kind} {what}{close} (`tunnel server --set help` lists the settings)"))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn parse_opt_addr(v: &str, w: &str) -> Result<Option<SocketAddr>> {
    if v.is_empty() || v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.parse::<SocketAddr>().map(Some).map_err(|_| Error::config(format!("{w} must be an address like 127.0.0.1:7835 (or off), got {v:?}")))
}

/// Whether `EMISSARY_<name>` has the shape of a Kubernetes service-link variable: `PORT`,
/// `SERVICE_HOST`, `SERVICE_PORT[_NAME]`, `PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]`, or the same for a
/// Service whose name starts with `emissary-` (`EMISSARY_FOO_SERVICE_HOST`, ...).
fn is_service_link(name: &str) -> bool {
    let proto = |p: &str| matches!(p, "TCP" | "UDP" | "SCTP");
    let port_n = |rest: &str| {
        let mut parts = rest.split('_');
        matches!(parts.next(), Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && parts.next().is_some_and(proto)
            && matches!((parts.next(), parts.next()), (None, _) | (Some("PROTO" | "PORT" | "ADDR"), None))
    };
    name == "PORT"
        || name.ends_with("_PORT") && name != "HTTP_PORT" && name != "TCP_PORT"
        || name == "SERVICE_HOST"
        || name.ends_with("_SERVICE_HOST")
        || name.starts_with("SERVICE_PORT")
        || name.contains("_SERVICE_PORT")
        || name.strip_prefix("PORT_").is_some_and(port_n)
        || name.split_once("_PORT_").is_some_and(|(_, rest)| port_n(rest))
}

fn port_to_addr(v: &str, var: &str) -> Result<String> {
    if v.trim().starts_with("tcp://") || v.trim().starts_with("udp://") {
        return Err(Error::config(format!(
            "{var}={v} is a Kubernetes service link (from a Service named {}), not a port: rename that Service, or set enableServiceLinks: false in the pod spec, or set {var} to a port number",
            var.trim_end_matches("_PORT").to_ascii_lowercase().replace('_', "-")
        )));
    }
    let port: u16 = v.trim().parse().map_err(|_| Error::config(format!("{var} must be a port number, got {v:?}")))?;
    Ok(if port == 0 { "off".into() } else { format!("0.0.0.0:{port}") })
}

/// Read a `.env` file if present, as Emissary (godotenv) reads it ([`crate::dotenv`]); a
/// malformed file is an error naming the line.
pub fn read_dotenv(path: &Path) -> Result<Vec<(String, String)>> {
    crate::dotenv::read(path).map_err(|e| Error::config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = r#"[{"kid":1,"data":"c2VjcmV0LXNlY3JldC1zZWNyZXQ="}]"#;
    const ALLOW: &str = r#"[{"host":"db.internal","port":5432}]"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn tunnel_env_and_defaults() {
        let c = RelayConfig::from_sources(None, &[], &env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("PATH", "/bin")]), &[]).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:7835".parse().unwrap()));
        assert_eq!(c.auth_keys.kids(), vec![1]);
        assert_eq!(c.health_path, "/healthz");
    }

    #[test]
    fn cluster_settings() {
        let base = [("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW)];
        let load = |extra: &[(&str, &str)]| {
            let mut e = env(&base);
            e.extend(env(extra));
            RelayConfig::from_sources(None, &[], &e, &[])
        };
        assert!(load(&[]).unwrap().cluster.is_none());
        let c = load(&[("TUNNEL_CLUSTER_REDIS", "redis://:pw@10.0.0.9:6379/2"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0LXNlY3JldA==")]).unwrap();
        let cl = c.cluster.expect("cluster on");
        assert_eq!((cl.key.kid, cl.claim_ttl, cl.namespace.as_str(), cl.advertise.as_deref()), (4, Duration::from_secs(10), "libtunnel", None));
        assert_eq!(cl.redacted_redis(), "redis://:***@10.0.0.9:6379/2");
        let e = load(&[("TUNNEL_CLUSTER_REDIS", "redis://127.0.0.1:6379")]).unwrap_err();
        assert!(e.message().contains("TUNNEL_CLUSTER_KEY") && e.message().contains("keygen"), "{e}");
        let e = load(&[("TUNNEL_CLUSTER_REDIS", "127.0.0.1:6379"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0")]).unwrap_err();
        assert!(e.message().contains("redis://127.0.0.1:6379"), "{e}");
        assert!(load(&[("TUNNEL_CLUSTER_REDIS", "rediss://r:6380"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0")]).unwrap().cluster.is_some());
        let e = load(&[("TUNNEL_CLUSTER_REDIS", "redis://r"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0"), ("TUNNEL_CLUSTER_REDIS_CA", "/nonexistent.pem")])
            .unwrap_err();
        assert!(e.message().contains("rediss://"), "{e}");
        let e =
            load(&[("TUNNEL_CLUSTER_REDIS", "rediss://r"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0"), ("TUNNEL_CLUSTER_REDIS_CA", "/nonexistent.pem")])
                .unwrap_err();
        assert!(e.message().contains("/nonexistent.pem"), "{e}");
        let e = load(&[("TUNNEL_CLUSTER_REDIS", "redis://r"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0"), ("TUNNEL_CLUSTER_TTL", "0.5")]).unwrap_err();
        assert!(e.message().contains("at least 1 second"), "{e}");
        let e = load(&[("TUNNEL_CLUSTER_REDIS", "redis://r"), ("TUNNEL_CLUSTER_KEY", "4:c2VjcmV0"), ("TUNNEL_CLUSTER_ADVERTISE", "10.0.0.5")])
            .unwrap_err();
        assert!(e.message().contains("TUNNEL_CLUSTER_ADVERTISE"), "{e}");
    }

    #[test]
    fn no_source_and_no_handshake_flood_can_take_more_than_half() {
        let l = Limits {
            max_connections: 100,
            max_connections_per_source: 1000,
            max_handshakes: 1000,
            max_handshakes_per_source: 1000,
            ..Limits::default()
        }
        .clamped();
        assert_eq!((l.max_connections_per_source, l.max_handshakes, l.max_handshakes_per_source), (50, 50, 50));
        let c = RelayConfig::from_sources(
            None,
            &[],
            &env(&[
                ("TUNNEL_AUTH_KEYS", KEYS),
                ("TUNNEL_ALLOW", ALLOW),
                ("TUNNEL_MAX_HANDSHAKES_PER_SOURCE", "7"),
                ("TUNNEL_HTTP_MAX_REQUESTS_PER_LISTENER", "9"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!((c.limits.max_handshakes_per_source, c.limits.http_max_requests_per_listener), (7, 9));
    }

    #[test]
    fn emissary_names_are_a_drop_in() {
        let c = RelayConfig::from_sources(
            None,
            &[],
            &env(&[
                ("EMISSARY_AUTH_KEYS", KEYS),
                ("EMISSARY_ALLOWED_PROXY_TARGETS", ALLOW),
                ("EMISSARY_TCP_PORT", "9001"),
                ("EMISSARY_DNS_SERVERS", "1.1.1.1 8.8.8.8"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(c.tcp_listen, Some("0.0.0.0:9001".parse().unwrap()));
        assert_eq!(c.dns_servers.len(), 2);
        let c = RelayConfig::from_sources(
            None,
            &[],
            &env(&[
                ("EMISSARY_AUTH_KEYS", KEYS),
                ("EMISSARY_ALLOWED_PROXY_TARGETS", ALLOW),
                ("EMISSARY_HTTP_PORT", "0"),
                ("EMISSARY_TCP_PORT", "9001"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.listen, None);
    }

    #[test]
    fn kubernetes_service_links_and_client_variables_are_tolerated() {
        let base = [("EMISSARY_AUTH_KEYS", KEYS), ("EMISSARY_ALLOWED_PROXY_TARGETS", ALLOW)];
        // What Kubernetes injects for a Service named `emissary` (ports 8080 and 9000), one named
        // `emissary-admin`, a misspelt Emissary name (warned about, as Emissary ignores it), and
        // the client variables one shared .env may hold.
        let noise = [
            ("EMISSARY_PORT", "tcp://10.0.0.7:8080"),
            ("EMISSARY_SERVICE_HOST", "10.0.0.7"),
            ("EMISSARY_SERVICE_PORT", "8080"),
            ("EMISSARY_SERVICE_PORT_HTTP", "8080"),
            ("EMISSARY_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
            ("EMISSARY_PORT_8080_TCP_PROTO", "tcp"),
            ("EMISSARY_PORT_8080_TCP_PORT", "8080"),
            ("EMISSARY_PORT_9000_UDP_ADDR", "10.0.0.7"),
            ("EMISSARY_ADMIN_SERVICE_HOST", "10.0.0.8"),
            ("EMISSARY_ADMIN_PORT", "tcp://10.0.0.8:80"),
            ("EMISSARY_ADMIN_PORT_80_TCP_ADDR", "10.0.0.8"),
            ("EMISSARY_AUTH_KEY", KEYS),
            ("TUNNEL_RELAY", "ws://relay:7835"),
            ("TUNNEL_KEY", "1:c2VjcmV0"),
            ("TUNNEL_LISTENER_KEY", "listener.pem"),
            ("TUNNEL_WORKER_THREADS", "4"),
            ("LIBTUNNEL_WORKER_THREADS", "4"),
        ];
        let all: Vec<(&str, &str)> = base.iter().chain(noise.iter()).copied().collect();
        let c = RelayConfig::from_sources(None, &[], &env(&all), &[]).unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:8080".parse().unwrap()));
        for name in ["PORT", "SERVICE_HOST", "SERVICE_PORT_HTTP", "PORT_8080_TCP", "PORT_53_UDP_PROTO", "X_SERVICE_PORT", "X_PORT_1_TCP_ADDR"] {
            assert!(is_service_link(name), "{name}");
        }
        for name in ["HTTP_PORT", "TCP_PORT", "AUTH_KEY", "PORT_X_TCP", "PORT_80_TCP_EXTRA", "HEALTH"] {
            assert!(!is_service_link(name), "{name}");
        }
        // A Service named `emissary-http` shadows EMISSARY_HTTP_PORT: say so instead of "not a port".
        let e = RelayConfig::from_sources(None, &[], &env(&[base[0], base[1], ("EMISSARY_HTTP_PORT", "tcp://10.0.0.9:80")]), &[]).unwrap_err();
        assert!(e.message().contains("Kubernetes service link") && e.message().contains("emissary-http"), "{e}");
        // TUNNEL_* typos are still errors with a suggestion.
        let e =
            RelayConfig::from_sources(None, &[], &env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_LISTENER_KEYZ", "x")]), &[])
                .unwrap_err();
        assert!(e.message().contains("did you mean TUNNEL_LISTENER_KEYS"), "{e}");
        // Service links alone do not switch the relay to Emissary's defaults.
        let c = RelayConfig::from_sources(None, &[], &env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), noise[0], noise[1]]), &[]).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:7835".parse().unwrap()));
    }

    #[test]
    fn precedence_file_dotenv_env_flags() {
        let toml = r#"
listen = "127.0.0.1:1000"
health_path = "/file"
auth_keys = [{kid = 1, data = "c2VjcmV0"}]
allow = [{host = "db.internal", port = 5432}]
"#;
        let c = RelayConfig::from_sources(
            Some(toml),
            &env(&[("TUNNEL_LISTEN", "127.0.0.1:2000"), ("TUNNEL_HEALTH_PATH", "/dotenv")]),
            &env(&[("TUNNEL_HEALTH_PATH", "/env")]),
            &[("listen".into(), "127.0.0.1:3000".into())],
        )
        .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:3000".parse().unwrap()));
        assert_eq!(c.health_path, "/env");
    }

    #[test]
    fn errors_name_the_variable_to_set() {
        let cases: Vec<(Vec<(String, String)>, &str)> = vec![
            (env(&[("TUNNEL_ALLOW", ALLOW)]), "TUNNEL_AUTH_KEYS"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS)]), "TUNNEL_ALLOW"),
            (env(&[("TUNNEL_AUTH_KEYS", "[]"), ("TUNNEL_ALLOW", ALLOW)]), "TUNNEL_AUTH_KEYS"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", "[]")]), "TUNNEL_ALLOW"),
            (env(&[("EMISSARY_AUTH_KEYS", KEYS), ("EMISSARY_ALLOWED_PROXY_TARGETS", "[]")]), "EMISSARY_ALLOWED_PROXY_TARGETS"),
            (env(&[("TUNNEL_AUTH_KEYS", "{bad"), ("TUNNEL_ALLOW", ALLOW)]), "TUNNEL_AUTH_KEYS must be a JSON list"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_LISTN", "x")]), "did you mean TUNNEL_LISTEN"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_LISTEN", "nowhere")]), "TUNNEL_LISTEN must be an address"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("EMISSARY_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW)]), "set only one"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_CONNECT_TIMEOUT", "-1")]), "positive number of seconds"),
            // These panicked (Duration::from_secs_f64 past Duration::MAX, a semaphore past its
            // permit limit at bind) or loaded a zero timeout.
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_CONNECT_TIMEOUT", "1e30")]), "positive number of seconds"),
            (env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_HANDSHAKE_TIMEOUT", "1e-12")]), "positive number of seconds"),
            (
                env(&[("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW), ("TUNNEL_MAX_CONNECTIONS", "18446744073709551615")]),
                "positive whole number",
            ),
        ];
        for (e, needle) in cases {
            let err = RelayConfig::from_sources(None, &[], &e, &[]).unwrap_err();
            assert!(err.message().contains(needle), "{e:?}: {err}");
        }
        let err = RelayConfig::from_sources(Some("lisen = 1"), &[], &[], &[]).unwrap_err();
        assert!(err.message().contains("did you mean listen"), "{err}");
    }

    #[test]
    fn public_https_path_and_rate_settings() {
        let base = [("TUNNEL_AUTH_KEYS", KEYS), ("TUNNEL_ALLOW", ALLOW)];
        let load = |extra: &[(&str, &str)]| RelayConfig::from_sources(None, &[], &env(&[&base[..], extra].concat()), &[]);
        let c = load(&[
            ("TUNNEL_HTTPS_LISTEN", "127.0.0.1:8443"),
            ("TUNNEL_PUBLIC_TLS_CERT", "a.pem, b.pem"),
            ("TUNNEL_PUBLIC_TLS_KEY", "a.key,b.key"),
            ("TUNNEL_HTTP_PATH_PREFIX", "/t/"),
            ("TUNNEL_HTTP_LISTENER_RATE", "500/300"),
        ])
        .expect("loads");
        assert_eq!(c.https_listen, Some("127.0.0.1:8443".parse().expect("addr")));
        assert_eq!(c.public_tls_cert, vec![PathBuf::from("a.pem"), PathBuf::from("b.pem")]);
        assert_eq!(c.public_tls_key, vec![PathBuf::from("a.key"), PathBuf::from("b.key")]);
        assert_eq!(c.http_path_prefix.as_deref(), Some("/t"));
        assert_eq!(c.http_listener_rate, Some((500, Duration::from_secs(300))));
        let d = load(&[]).expect("defaults");
        assert_eq!((d.https_listen, d.http_path_prefix, d.http_listener_rate), (None, None, None), "all off by default");
        for (extra, needle) in [
            (vec![("TUNNEL_HTTPS_LISTEN", "127.0.0.1:8443")], "no certificate"),
            (vec![("TUNNEL_PUBLIC_TLS_CERT", "a.pem,b.pem"), ("TUNNEL_PUBLIC_TLS_KEY", "a.key")], "one key per certificate"),
            (vec![("TUNNEL_HTTP_PATH_PREFIX", "t")], "one path segment like /t"),
            (vec![("TUNNEL_HTTP_PATH_PREFIX", "/a/b")], "one path segment like /t"),
            (vec![("TUNNEL_HTTP_LISTENER_RATE", "500")], "REQUESTS/SECONDS"),
            (vec![("TUNNEL_HTTP_LISTENER_RATE", "0/10")], "REQUESTS/SECONDS"),
        ] {
            let err = load(&extra).unwrap_err();
            assert!(err.message().contains(needle), "{extra:?}: {err}");
        }
    }
}
