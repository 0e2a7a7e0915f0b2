//! The one table of the relay's settings. Each row names a setting, where its value goes in the
//! [`RelayConfig`](super::RelayConfig) (a setting that feeds a field of another name says so:
//! `max_streams` fills `limits.max_streams_per_session`), its parser, its default, its bounds,
//! whether a SIGHUP reloads it, whether it is secret, its `EMISSARY_*` alias and its help line.
//! The [`Limits`] struct is declared by its rows.
//!
//! Everything else is generated from it: the loader's parsing and bounds errors
//! ([`super::RelayConfig::from_sources`]), [`Limits::default`] and [`Limits::clamped`] (and through
//! them [`crate::mux::MuxConfig`]'s defaults), `tunnel server --set help` ([`help_table`]), the
//! admin endpoint's `/config` ([`super::RelayConfig::settings_json`]), `deploy/relay.env.example`
//! ([`env_example`]) and `docs/reference/settings.md` ([`reference_page`]); `core/tests/it/deploy_files.rs`
//! fails when a generated file is stale (`LIBTUNNEL_REGENERATE=1` rewrites them).
//!
//! A new setting is one row here, plus the code that uses its value.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::{ExitGrant, ListenerGrant, RelayConfig};
use crate::auth::{Key, KeyJson, KeySet};
use crate::egress::allowlist::Allowlist;
use crate::env::{MAX_COUNT, MAX_SECONDS};
use crate::error::{Error, Result};

/// The range a number must be in. One range per setting: the loader refuses a value outside it
/// (naming the range) and [`Limits::clamped`] brings a value set in code into it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bounds {
    /// Not a number, or any value the parser takes.
    Any,
    /// A whole number from `min` to `max`.
    Count(usize, usize),
    /// Seconds from `min` to `max`.
    Seconds(f64, f64),
}

/// Counts size semaphores and buffers, which panic or abort past their limits.
const COUNT: Bounds = Bounds::Count(1, MAX_COUNT);
/// A duration that rounds to zero would time everything out, and one near `Duration::MAX` would
/// overflow the deadlines computed from it.
const SECONDS: Bounds = Bounds::Seconds(0.001, MAX_SECONDS);

impl Bounds {
    /// The range in words, for `--set help`-like texts and the reference page.
    pub fn describe(&self) -> String {
        match *self {
            Bounds::Any => String::new(),
            Bounds::Count(a, b) => format!("{a} to {b}"),
            Bounds::Seconds(a, b) => format!("{a} to {b} s"),
        }
    }
}

/// Whether a SIGHUP (or [`crate::Reloader`]) takes a new value of the setting, and whether its
/// value is a secret (never shown by `/config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// A running relay takes a new value on SIGHUP; the others wait for a restart.
    pub reload: bool,
    /// Never shown (`/config` leaves it out).
    pub secret: bool,
}

/// Where the settings are grouped in `relay.env.example` and the reference page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Keys, allowlist, listener grants, exits.
    Access,
    /// Addresses, certificates, paths.
    Endpoints,
    /// The Redis cluster.
    Cluster,
    /// Timeouts (seconds).
    Timeouts,
    /// Counts and sizes.
    Limits,
}

impl Group {
    fn title(self) -> &'static str {
        match self {
            Group::Access => "Who may use the relay (at least one of auth_keys, listener_keys, listeners_open)",
            Group::Endpoints => "Endpoints",
            Group::Cluster => "Cluster (several relays, one namespace)",
            Group::Timeouts => "Timeouts (seconds)",
            Group::Limits => "Limits",
        }
    }
}

/// The loader's work in progress: the config, and the cluster settings that become a
/// [`super::ClusterConfig`] once all are read.
#[derive(Debug)]
pub(crate) struct Draft {
    pub(crate) cfg: RelayConfig,
    pub(crate) cluster: ClusterDraft,
}

/// The cluster settings as read, before `cluster_redis` decides whether there is a cluster.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterDraft {
    pub(crate) redis: Option<String>,
    pub(crate) redis_ca: Option<PathBuf>,
    pub(crate) key: Option<Key>,
    pub(crate) advertise: Option<String>,
    pub(crate) claim_ttl: Duration,
    pub(crate) namespace: String,
}

/// One relay setting: a row of [`SETTINGS`].
pub struct Setting {
    /// Lower-case name: the TOML key, `--set NAME=`; `TUNNEL_` + upper case is the variable.
    pub name: &'static str,
    /// The Emissary variable (`EMISSARY_` + this) that sets it too, if any.
    pub emissary: Option<&'static str>,
    /// The value in force when it is not set, as `--set help` and `relay.env.example` show it.
    pub default: &'static str,
    /// Whether [`Setting::default`] is a value the parser takes (else: no value, the field stays off).
    pub default_is_value: bool,
    /// The range a value must be in.
    pub bounds: Bounds,
    /// Reload on SIGHUP; secret.
    pub flags: Flags,
    /// What it does (one line).
    pub help: &'static str,
    /// Where its value goes: the path of the field in the config (`limits.max_streams_per_session`).
    pub field: &'static [&'static str],
    /// Where it is grouped.
    pub group: Group,
    /// A value to fill in, shown in `relay.env.example` when there is no default.
    pub example: Option<&'static str>,
    apply: fn(&mut Draft, &str, &str, &Setting) -> Result<()>,
    show: fn(&RelayConfig) -> Value,
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setting").field("name", &self.name).field("default", &self.default).finish_non_exhaustive()
    }
}

impl Setting {
    /// The environment variable: `TUNNEL_` + the name in upper case.
    pub fn var(&self) -> String {
        format!("TUNNEL_{}", self.name.to_ascii_uppercase())
    }

    /// Parse `text` (set by `var`) into the draft.
    pub(crate) fn apply(&self, draft: &mut Draft, text: &str, var: &str) -> Result<()> {
        (self.apply)(draft, text.trim(), var, self)
    }

    /// The value in force in `cfg`, as typed JSON.
    pub fn show(&self, cfg: &RelayConfig) -> Value {
        (self.show)(cfg)
    }
}

macro_rules! opt {
    () => {
        None
    };
    ($e:expr) => {
        Some($e)
    };
}

/// The first expression if there is one, else the one after `;`.
macro_rules! or {
    (; $d:expr) => {
        $d
    };
    ($e:expr; $d:expr) => {
        $e
    };
    ($e:expr; $v:expr; $d:expr) => {
        $v
    };
}

/// `[reload]`, `[secret]`, `[reload, secret]` or nothing.
macro_rules! flags {
    () => {
        Flags { reload: false, secret: false }
    };
    (reload) => {
        Flags { reload: true, secret: false }
    };
    (secret) => {
        Flags { reload: false, secret: true }
    };
    (reload secret) => {
        Flags { reload: true, secret: true }
    };
}

macro_rules! name_of {
    ($f:ident) => {
        stringify!($f)
    };
    ($f:ident as $n:ident) => {
        stringify!($n)
    };
}

macro_rules! show_of {
    (cfg $($f:ident).+) => {
        |c: &RelayConfig| Show::show(&c.$($f).+)
    };
    (cluster $f:ident) => {
        |c: &RelayConfig| c.cluster.as_ref().map_or(Value::Null, |k| Show::show(&k.$f))
    };
}

/// The table. A `relay { ... }` row: its help line; `name: Group, path <- parser`, the path in the
/// draft its value goes to (`cfg.` the config, `cluster.` the cluster settings); `default "text"`
/// (parsed like a value) or `unset "what that means"`; then, when they apply, `range BOUNDS`,
/// `[reload, secret]`, `emissary "NAME"`, `example "value to fill in"`. A `limits { ... }` row
/// declares a field of [`Limits`] (`field as name` where the setting's name differs), its parser,
/// default and help line, and `range` where it is not the type's ([`Clamp::BOUNDS`]).
macro_rules! settings {
    (
        relay {
            $( $help:literal
               $name:ident: $group:ident, $root:ident $(. $f:ident)+ <- $parse:path, $(default $dv:literal)? $(unset $du:literal)?
               $(, range $bounds:expr)? $(, [$($flag:ident),*])? $(, emissary $em:literal)? $(, example $ex:literal)?; )*
        }
        limits {
            $( $(#[$doc:meta])* $field:ident $(as $alias:ident)?: $ty:ty = $lparse:path, default $ldefault:literal, $lhelp:literal
               $(, range $lbounds:expr)?; )*
        }
    ) => {
        /// Every relay setting, in the order `--set help` lists them.
        pub const SETTINGS: &[Setting] = &[
            $(Setting {
                name: stringify!($name),
                emissary: opt!($($em)?),
                default: or!($($dv)? $($du)?; ""),
                default_is_value: or!($($dv; true)?; false),
                bounds: or!($($bounds)?; Bounds::Any),
                flags: flags!($($($flag)*)?),
                help: $help,
                field: &[$(stringify!($f)),+],
                group: Group::$group,
                example: opt!($($ex)?),
                apply: |d, text, var, s| {
                    d.$root.$($f).+ = $parse(text, var, s)?;
                    Ok(())
                },
                show: show_of!($root $($f).+),
            },)*
            $(Setting {
                name: name_of!($field $(as $alias)?),
                emissary: None,
                default: $ldefault,
                default_is_value: true,
                bounds: or!($($lbounds)?; <$ty as Clamp>::BOUNDS),
                flags: flags!(),
                help: $lhelp,
                field: &["limits", stringify!($field)],
                group: if matches!(or!($($lbounds)?; <$ty as Clamp>::BOUNDS), Bounds::Seconds(..)) { Group::Timeouts } else { Group::Limits },
                example: None,
                apply: |d, text, var, s| {
                    d.cfg.limits.$field = $lparse(text, var, s)?;
                    Ok(())
                },
                show: |c| Show::show(&c.limits.$field),
            },)*
        ];

        /// Safety limits of the relay: the `limits` rows of [`SETTINGS`], which give each its
        /// setting name, default and range. Defaults suit a relay on the edge of a private network.
        #[derive(Debug, Clone)]
        pub struct Limits {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                static DEFAULT: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
                DEFAULT.get_or_init(|| Limits {
                    $( $field: {
                        let s = lookup(name_of!($field $(as $alias)?)).expect("a row of the table");
                        $lparse($ldefault, s.name, s).expect("every default in the table is within its bounds (tested)")
                    }, )*
                }).clone()
            }
        }

        impl Limits {
            /// Every limit within its row's bounds (a config built in code skips the loader's
            /// checks; an out-of-range value would otherwise panic in a semaphore or a deadline
            /// computation); then no source, and no handshake flood, can take more than half
            /// the relay.
            pub fn clamped(self) -> Limits {
                let mut l = Limits { $( $field: Clamp::clamp(self.$field, or!($($lbounds)?; <$ty as Clamp>::BOUNDS)), )* };
                let half = (l.max_connections / 2).max(1);
                l.max_connections_per_source = l.max_connections_per_source.min(half);
                l.max_handshakes = l.max_handshakes.min(half);
                l.max_handshakes_per_source = l.max_handshakes_per_source.min(l.max_handshakes);
                l
            }
        }
    };
}

settings! {
    relay {
        "tunnel endpoint address (WebSocket; TLS when a cert is set), or off"
        listen: Endpoints, cfg.listen <- addr_or_off, default "127.0.0.1:7835", emissary "HTTP_PORT";
        "raw-TCP tunnel endpoint address, or off"
        tcp_listen: Endpoints, cfg.tcp_listen <- addr_or_off, default "off", emissary "TCP_PORT";
        "public HTTP port routing by Host to listeners, or off"
        http_listen: Endpoints, cfg.http_listen <- addr_or_off, default "off";
        "public HTTPS port (HTTP/1.1 and h2 by ALPN, TLS passthrough by SNI), or off"
        https_listen: Endpoints, cfg.https_listen <- addr_or_off, default "off";
        "QUIC tunnel endpoint address (UDP, for quic:// clients; needs tls_cert and tls_key), or off"
        quic_listen: Endpoints, cfg.quic_listen <- addr_or_off, default "off";
        "congestion controller of QUIC sessions: cubic, bbr or newreno (clients: TUNNEL_QUIC_CONGESTION)"
        quic_congestion: Endpoints, cfg.quic_congestion <- congestion, default "cubic";
        "PEM certificate chain(s) for the public HTTPS port, comma separated, chosen by SNI"
        public_tls_cert: Endpoints, cfg.public_tls_cert <- path_list, unset "none", [reload], example "/etc/libtunnel/wildcard.crt";
        "PEM private key(s), one per public_tls_cert, same order"
        public_tls_key: Endpoints, cfg.public_tls_key <- path_list, unset "none", [reload], example "/etc/libtunnel/wildcard.key";
        "path routing: with /t, <domain>/t/NAME/x reaches NAME as /x"
        http_path_prefix: Endpoints, cfg.http_path_prefix <- path_prefix, default "off";
        "public requests per listener per window as REQUESTS/SECONDS, e.g. 500/300 (then 429), or off"
        http_listener_rate: Endpoints, cfg.http_listener_rate <- rate, default "off";
        "domain under which listener names are served"
        domain: Endpoints, cfg.domain <- domain, default "localhost";
        "JSON list of {kid, data} shared-secret keys"
        auth_keys: Access, cfg.auth_keys <- auth_keys, unset "none", [reload, secret], emissary "AUTH_KEYS",
            example r#"[{"kid":1,"data":"<base64 secret>"}]"#;
        "JSON list of {host, port} allow rules"
        allow: Access, cfg.allow <- allowlist, unset "none", [reload], emissary "ALLOWED_PROXY_TARGETS",
            example r#"[{"host":"db.internal","port":5432}]"#;
        "JSON list of {public_key, names}: listener keys and their chosen names"
        listener_keys: Access, cfg.listener_keys <- listener_grants, unset "none", [reload],
            example r#"[{"public_key":"<base64>","names":["api"]}]"#;
        "let any listener key register its key-derived name (true/false)"
        listeners_open: Access, cfg.listeners_open <- boolean, default "false", [reload];
        "JSON list of {name, key_ids}: exit listeners and the dialer key ids that may dial via each"
        exits: Access, cfg.exits <- exit_grants, unset "none", [reload], example r#"[{"name":"office","key_ids":[1]}]"#;
        "public TCP port range for listeners, e.g. 20000-20099, or off"
        tcp_ports: Endpoints, cfg.tcp_ports <- port_range, default "off";
        "IP the public TCP ports bind on"
        tcp_ports_bind: Endpoints, cfg.tcp_ports_bind <- ip, default "127.0.0.1";
        "PEM certificate chain for wss://"
        tls_cert: Endpoints, cfg.tls_cert <- path, default "off", example "/etc/libtunnel/relay.crt";
        "PEM private key for wss://"
        tls_key: Endpoints, cfg.tls_key <- path, default "off", example "/etc/libtunnel/relay.key";
        "health check path"
        health_path: Endpoints, cfg.health_path <- health_path, default "/healthz", emissary "HEALTH_PATH";
        "space-separated DNS server IPs for resolving targets"
        dns_servers: Endpoints, cfg.dns_servers <- dns_servers, unset "system resolver", emissary "DNS_SERVERS";
        "admin endpoint address (listeners, sessions, config, metrics as JSON; token required; /metrics moves there), or off"
        admin_listen: Endpoints, cfg.admin_listen <- addr_or_off, default "off";
        "bearer token the admin endpoint requires, at least 16 characters"
        admin_token: Endpoints, cfg.admin_token <- text_or_none, unset "none", [secret],
            example "<at least 16 characters; required with TUNNEL_ADMIN_LISTEN>";
        "load balancers (IPs/CIDRs, space separated) whose connections start with a PROXY header (v1 or v2) naming the client"
        proxy_protocol_from: Endpoints, cfg.proxy_protocol_from <- nets, unset "none";
        "Redis URL of the cluster this relay is a node of (redis://host:6379, rediss://, or redis+sentinel://host:26379,host:26379/MASTER to follow a Sentinel-managed primary), or off"
        cluster_redis: Cluster, cluster.redis <- redis_url, default "off", [secret];
        "PEM CA file to trust for a rediss:// (TLS) cluster_redis; default: system roots"
        cluster_redis_ca: Cluster, cluster.redis_ca <- path, unset "system roots";
        "KID:BASE64 key every node of the cluster shares (`tunnel keygen --cluster` prints one)"
        cluster_key: Cluster, cluster.key <- key, unset "none", [secret];
        "URL other nodes reach this one at (tcp:// or ws://); default from tcp_listen, else listen"
        cluster_advertise: Cluster, cluster.advertise <- relay_url, unset "from tcp_listen, else listen";
        "seconds a dead node's listener names stay claimed (refreshed every third of it)"
        cluster_ttl: Cluster, cluster.claim_ttl <- seconds, default "10", range Bounds::Seconds(1.0, MAX_SECONDS);
        "prefix of the cluster's Redis keys and channel (several clusters on one Redis)"
        cluster_namespace: Cluster, cluster.namespace <- text, default "libtunnel";
    }
    limits {
        /// A client must finish the WebSocket upgrade and authentication within this time.
        handshake_timeout: Duration = seconds, default "10", "seconds a client has to authenticate";
        /// Connecting to a target (DNS included) may take this long before reply 0x06.
        connect_timeout: Duration = seconds, default "10", "seconds to connect to a target";
        /// On shutdown, open streams get this long to finish.
        drain_timeout: Duration = seconds, default "30", "seconds open streams get to finish at shutdown";
        /// Ping a silent session after this long.
        keepalive_interval: Duration = seconds, default "10", "seconds of silence before a ping";
        /// Drop a session silent for this long.
        keepalive_timeout: Duration = seconds, default "20", "seconds of silence before a session is dropped";
        /// A listener must answer a public HTTP request (response headers) within this time, else
        /// 504; and a public client that takes none of a response body for this long has it reset.
        http_timeout: Duration = seconds, default "30",
            "seconds a listener has to answer a public request (then 504), and a client to read on (then reset)";
        /// A public HTTP client must send a request head within this time (slowloris).
        http_header_timeout: Duration = seconds, default "10", "seconds a public HTTP client has to send its request head";
        /// Most streams open at once on one multiplexed session.
        max_streams_per_session as max_streams: usize = count, default "4096", "most open streams per session";
        /// Most transport connections open at once.
        max_connections: usize = count, default "10000", "most open transport connections";
        /// Largest receive window one stream may grow to on a long link (bytes). At least the
        /// window every stream starts with (`mux::flow::WINDOW`, 256 KiB: a smaller one
        /// cannot be honoured), at most the largest `session_receive_budget` (2^28: a stream
        /// could never grow past what its session may grant).
        max_stream_window: usize = count, default "16777216",
            "largest receive window one stream may grow to, bytes", range Bounds::Count(256 * 1024, MAX_COUNT);
        /// Most window all streams of one session may have granted beyond their initial 256 KiB
        /// each (bytes): what bounds the data a session buffers for slow readers.
        session_receive_budget: usize = count, default "67108864", "most window a session's streams may grow together, bytes";
        /// No longer limits anything: the relay streams classic WebSocket messages frame by frame,
        /// so a message of any size (Emissary's dialer sends each write as one) passes with
        /// bounded memory. Kept so configs that set it still load.
        classic_max_message: usize = count, default "16777216",
            "ignored (classic messages of any size are streamed); accepted for old configs";
        /// Most multiplexed sessions open at once with one shared key (a leaked key cannot take
        /// the whole relay).
        max_sessions_per_key: usize = count, default "64", "most multiplexed sessions open at once per shared key";
        /// Most streams the relay has offered one listener session and not yet had accepted; more
        /// are refused at once (503 on the HTTP port, REFUSED for dialers).
        max_pending_accepts: usize = count, default "2048", "most streams waiting for one listener to accept them";
        /// Largest request head (request line and headers) on the public HTTP port, in bytes.
        http_max_header_bytes: usize = count, default "65536",
            "largest public HTTP request head in bytes", range Bounds::Count(8192, MAX_COUNT);
        /// Failed authentications one source address may make per minute; past that its attempts
        /// are refused without being checked until the minute is over.
        auth_failures_per_minute: usize = count, default "10", "failed authentications per source address per minute before it is refused";
        /// Most connections one source (an IPv4 address, an IPv6 /64) may hold open,
        /// authenticated or not, on all endpoints together; at most half of `max_connections`.
        max_connections_per_source: usize = count, default "1024",
            "most open connections per source address (IPv6: per /64); at most max_connections/2";
        /// Most connections one source may have in their handshake (not yet authenticated; on
        /// the public HTTP port: no request head yet); at most `max_handshakes`.
        max_handshakes_per_source: usize = count, default "128",
            "most not-yet-authenticated connections per source address (IPv6: per /64)";
        /// Most connections in their handshake at once, from all sources; at most half of
        /// `max_connections`, so authenticated sessions always keep the other half.
        max_handshakes: usize = count, default "1024", "most not-yet-authenticated connections in all; at most max_connections/2";
        /// Most public HTTP requests one source may have in progress (more: 429).
        http_max_requests_per_source: usize = count, default "128", "most public HTTP requests in progress per source address (then 429)";
        /// Most public HTTP requests one listener may have in progress (more: 503).
        http_max_requests_per_listener: usize = count, default "1024", "most public HTTP requests in progress per listener (then 503)";
    }
}

/// A session's settings from the relay's limits.
impl From<&Limits> for crate::mux::MuxConfig {
    fn from(l: &Limits) -> Self {
        crate::mux::MuxConfig {
            keepalive_interval: l.keepalive_interval,
            keepalive_timeout: l.keepalive_timeout,
            max_streams: l.max_streams_per_session,
            accept_backlog: 1024,
            write_budget: 4 * 1024 * 1024,
            max_stream_window: u32::try_from(l.max_stream_window).unwrap_or(u32::MAX),
            receive_budget: l.session_receive_budget,
        }
    }
}

/// Every session's defaults (dialers' and listeners' too) are the relay settings' defaults.
impl Default for crate::mux::MuxConfig {
    fn default() -> Self {
        crate::mux::MuxConfig::from(&Limits::default())
    }
}

/// The row named `name` (lower case), if any.
pub fn lookup(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

// ---- parsers: `(text, where it came from, the row) -> value`; every error names `var` ----

fn out_of_range(var: &str, text: &str, s: &Setting, what: &str) -> Error {
    Error::config(format!(
        "{var} must be {what} from {}, got {text:?}; set a value in that range, or unset it for the default ({})",
        s.bounds.describe(),
        s.default
    ))
}

fn count(text: &str, var: &str, s: &Setting) -> Result<usize> {
    let Bounds::Count(min, max) = s.bounds else { unreachable!("count rows have count bounds") };
    text.parse::<usize>().ok().filter(|n| (min..=max).contains(n)).ok_or_else(|| out_of_range(var, text, s, "a positive whole number"))
}

fn seconds(text: &str, var: &str, s: &Setting) -> Result<Duration> {
    let Bounds::Seconds(min, max) = s.bounds else { unreachable!("seconds rows have seconds bounds") };
    let secs = text.parse::<f64>().ok().filter(|v| v.is_finite() && (min..=max).contains(v));
    // The same check as every face's timeouts (`crate::env::checked_seconds`).
    secs.and_then(|v| crate::env::checked_seconds(var, v).ok()).ok_or_else(|| {
        Error::config(format!(
            "{var} must be a positive number of seconds, at least {min} second(s) and at most {max} (30 days); got {text:?} (default {})",
            s.default
        ))
    })
}

fn off(text: &str) -> bool {
    text.is_empty() || text.eq_ignore_ascii_case("off")
}

fn addr_or_off(text: &str, var: &str, _: &Setting) -> Result<Option<SocketAddr>> {
    if off(text) {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|_| Error::config(format!("{var} must be an address like 127.0.0.1:7835 (or off), got {text:?}")))
}

fn path_list(text: &str, _: &str, _: &Setting) -> Result<Vec<PathBuf>> {
    Ok(text.split(',').map(str::trim).filter(|p| !p.is_empty()).map(PathBuf::from).collect())
}

fn path(text: &str, _: &str, _: &Setting) -> Result<Option<PathBuf>> {
    Ok((!off(text)).then(|| PathBuf::from(text)))
}

fn path_prefix(text: &str, var: &str, _: &Setting) -> Result<Option<String>> {
    if off(text) {
        return Ok(None);
    }
    let p = text.trim_end_matches('/');
    if !p.starts_with('/') || p.len() < 2 || p[1..].contains('/') {
        return Err(Error::config(format!("{var} must be one path segment like /t (or off), got {text:?}")));
    }
    Ok(Some(p.to_string()))
}

fn rate(text: &str, var: &str, _: &Setting) -> Result<Option<(u64, Duration)>> {
    if off(text) {
        return Ok(None);
    }
    let bad =
        || Error::config(format!("{var} must be REQUESTS/SECONDS like 500/300 (500 requests per 5 minutes per listener), or off; got {text:?}"));
    let (n, secs) = text.split_once('/').ok_or_else(bad)?;
    let n: u64 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
    let secs: u64 = secs.trim().parse().ok().filter(|s| *s > 0 && (*s as f64) <= MAX_SECONDS).ok_or_else(bad)?;
    Ok(Some((n, Duration::from_secs(secs))))
}

fn domain(text: &str, _: &str, _: &Setting) -> Result<String> {
    Ok(text.trim_matches('.').to_ascii_lowercase())
}

fn text(text: &str, _: &str, _: &Setting) -> Result<String> {
    Ok(text.to_string())
}

fn text_or_none(text: &str, _: &str, _: &Setting) -> Result<Option<String>> {
    Ok(Some(text.to_string()).filter(|t| !t.is_empty()))
}

fn congestion(text: &str, var: &str, _: &Setting) -> Result<crate::transport::quic::Congestion> {
    crate::transport::quic::Congestion::parse(text).map_err(|why| Error::config(format!("{var}: {why}")))
}

fn boolean(text: &str, var: &str, _: &Setting) -> Result<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::config(format!("{var} must be true or false, got {text:?}"))),
    }
}

fn auth_keys(text: &str, var: &str, _: &Setting) -> Result<KeySet> {
    let list: Vec<KeyJson> = serde_json::from_str(text).map_err(|e| {
        Error::config(format!("{var} must be a JSON list like [{{\"kid\": 1, \"data\": \"<base64>\"}}] ({e}); `tunnel keygen` prints one"))
    })?;
    let keys = list.iter().map(|k| Key::from_json(k).map_err(|e| Error::config(format!("{var}: {}", e.message())))).collect::<Result<Vec<_>>>()?;
    KeySet::new(keys).map_err(|e| Error::config(format!("{var}: {}", e.message())))
}

fn allowlist(text: &str, var: &str, _: &Setting) -> Result<Allowlist> {
    Allowlist::from_json(text, var)
}

fn listener_grants(text: &str, var: &str, _: &Setting) -> Result<Vec<ListenerGrant>> {
    let grants: Vec<ListenerGrant> = serde_json::from_str(text)
        .map_err(|e| Error::config(format!("{var} must be a JSON list like [{{\"public_key\": \"<base64>\", \"names\": [\"api\"]}}] ({e})")))?;
    for g in &grants {
        crate::identity::parse_public_key(&g.public_key).map_err(|e| Error::config(format!("listener_keys: {}", e.message())))?;
        if let Some(bad) = g.names.iter().find(|n| !crate::identity::valid_name(n)) {
            return Err(Error::config(format!("listener_keys: name {bad:?} is not valid; use 1-63 lowercase letters, digits and '-'")));
        }
    }
    Ok(grants)
}

fn exit_grants(text: &str, var: &str, _: &Setting) -> Result<Vec<ExitGrant>> {
    let exits: Vec<ExitGrant> = serde_json::from_str(text)
        .map_err(|e| Error::config(format!("{var} must be a JSON list like [{{\"name\": \"corp\", \"key_ids\": [1]}}] ({e})")))?;
    if let Some(bad) = exits.iter().find(|g| !crate::identity::valid_name(&g.name)) {
        return Err(Error::config(format!(
            "{var}: exit name {:?} is not a valid listener name; use 1-63 lowercase letters, digits and '-'",
            bad.name
        )));
    }
    Ok(exits)
}

fn port_range(text: &str, var: &str, _: &Setting) -> Result<Option<(u16, u16)>> {
    if off(text) {
        return Ok(None);
    }
    let bad = || Error::config(format!("{var} must be a port range like 20000-20099 (or off), got {text:?}"));
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let (a, b) = (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

fn ip(text: &str, var: &str, _: &Setting) -> Result<IpAddr> {
    text.parse().map_err(|_| Error::config(format!("{var} must be an IP address like 0.0.0.0, got {text:?}")))
}

fn health_path(text: &str, var: &str, _: &Setting) -> Result<String> {
    if !text.starts_with('/') {
        return Err(Error::config(format!("{var} must start with '/', like /healthz")));
    }
    Ok(text.to_string())
}

fn dns_servers(text: &str, var: &str, _: &Setting) -> Result<Vec<SocketAddr>> {
    text.split_whitespace()
        .map(|s| {
            s.parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
                .or_else(|_| s.parse::<SocketAddr>())
                .map_err(|_| Error::config(format!("{var}: {s:?} is not an IP address (list IPs, or IP:PORT, separated by spaces)")))
        })
        .collect()
}

fn nets(text: &str, var: &str, _: &Setting) -> Result<Vec<ipnet::IpNet>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty() && *s != "off")
        .map(|s| {
            s.parse::<ipnet::IpNet>().or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from)).map_err(|_| {
                Error::config(format!("{var}: {s:?} is not an IP address or CIDR (list the load balancers' addresses, e.g. 10.0.0.0/24 10.0.1.5)"))
            })
        })
        .collect()
}

fn redis_url(text: &str, var: &str, _: &Setting) -> Result<Option<String>> {
    if off(text) {
        return Ok(None);
    }
    if !["redis://", "rediss://", "redis+unix://", "unix://", "redis+sentinel://"].iter().any(|p| text.starts_with(p)) {
        return Err(Error::config(format!(
            "{var} must be a Redis URL like redis://127.0.0.1:6379 (rediss:// for TLS, unix:///run/redis.sock, or redis+sentinel://host:26379,host:26379/MASTER)"
        )));
    }
    Ok(Some(text.to_string()))
}

fn key(text: &str, var: &str, _: &Setting) -> Result<Option<Key>> {
    Key::parse(text).map(Some).map_err(|e| Error::config(format!("{var}: {}", e.message())))
}

fn relay_url(text: &str, var: &str, _: &Setting) -> Result<Option<String>> {
    crate::transport::RelayUrl::parse(text).map_err(|e| Error::config(format!("{var}: {}", e.message())))?;
    Ok(Some(text.to_string()))
}

// ---- values as typed JSON (`/config`) and clamped into their bounds ----

/// A setting's value as typed JSON: numbers, strings, lists, `null` for off; durations in seconds.
trait Show {
    fn show(&self) -> Value;
}

macro_rules! show_as_json {
    ($($t:ty),*) => { $(impl Show for $t { fn show(&self) -> Value { json!(self) } })* };
}
show_as_json!(usize, bool, String, Option<String>, Option<PathBuf>, Vec<PathBuf>);

impl Show for crate::transport::quic::Congestion {
    fn show(&self) -> Value {
        json!(self.name())
    }
}

impl Show for Duration {
    fn show(&self) -> Value {
        json!(self.as_secs_f64())
    }
}

impl Show for Option<SocketAddr> {
    fn show(&self) -> Value {
        json!(self.map(|a| a.to_string()))
    }
}

impl Show for IpAddr {
    fn show(&self) -> Value {
        json!(self.to_string())
    }
}

impl Show for Vec<SocketAddr> {
    fn show(&self) -> Value {
        json!(self.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }
}

impl Show for Vec<ipnet::IpNet> {
    fn show(&self) -> Value {
        json!(self.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }
}

impl Show for Option<(u16, u16)> {
    fn show(&self) -> Value {
        json!(self.map(|(a, b)| format!("{a}-{b}")))
    }
}

impl Show for Option<(u64, Duration)> {
    fn show(&self) -> Value {
        json!(self.map(|(n, w)| format!("{n}/{}", w.as_secs())))
    }
}

impl Show for Vec<ListenerGrant> {
    fn show(&self) -> Value {
        json!(self.iter().map(|g| json!({"public_key": g.public_key, "names": g.names})).collect::<Vec<_>>())
    }
}

impl Show for Vec<ExitGrant> {
    fn show(&self) -> Value {
        json!(self.iter().map(|g| json!({"name": g.name, "key_ids": g.key_ids})).collect::<Vec<_>>())
    }
}

/// The number of rules (the rules themselves are in the config file).
impl Show for Allowlist {
    fn show(&self) -> Value {
        json!(self.len())
    }
}

/// Key ids only: secrets are never shown (and the secret rows are left out anyway).
impl Show for KeySet {
    fn show(&self) -> Value {
        json!(self.kids())
    }
}

impl Show for Key {
    fn show(&self) -> Value {
        json!(self.kid)
    }
}

/// A value brought into its row's bounds.
trait Clamp {
    /// The range of a setting of this type unless its row names another.
    const BOUNDS: Bounds;
    fn clamp(self, bounds: Bounds) -> Self;
}

impl Clamp for usize {
    const BOUNDS: Bounds = COUNT;
    fn clamp(self, bounds: Bounds) -> Self {
        match bounds {
            Bounds::Count(a, b) => Ord::clamp(self, a, b),
            _ => self,
        }
    }
}

impl Clamp for Duration {
    const BOUNDS: Bounds = SECONDS;
    fn clamp(self, bounds: Bounds) -> Self {
        match bounds {
            Bounds::Seconds(a, b) => Ord::clamp(self, Duration::from_secs_f64(a), Duration::from_secs_f64(b)),
            _ => self,
        }
    }
}

// ---- generated texts ----

/// `tunnel server --set help`: every setting with its default, aligned.
pub fn help_table() -> String {
    let name_w = SETTINGS.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let default_w = SETTINGS.iter().map(|s| s.default.len()).max().unwrap_or(0);
    let mut out = format!("{:<name_w$}  {:<default_w$}  {}\n", "SETTING", "DEFAULT", "WHAT (variable: TUNNEL_ + the name in upper case)");
    for s in SETTINGS {
        let range = match s.bounds {
            Bounds::Any => String::new(),
            b => format!(" [{}]", b.describe()),
        };
        out.push_str(&format!("{:<name_w$}  {:<default_w$}  {}{range}\n", s.name, s.default, s.help));
    }
    out
}

fn groups() -> impl Iterator<Item = (Group, Vec<&'static Setting>)> {
    [Group::Access, Group::Endpoints, Group::Cluster, Group::Timeouts, Group::Limits]
        .into_iter()
        .map(|g| (g, SETTINGS.iter().filter(|s| s.group == g).collect::<Vec<_>>()))
}

/// `deploy/relay.env.example`: every setting, commented out, with its default (or a value to fill
/// in), grouped.
pub fn env_example() -> String {
    let mut out = String::from(
        "# Every setting of `tunnel server`, with its default. Copy to /etc/libtunnel/relay.env (the\n\
         # systemd unit reads it) or to ./.env beside the relay, and uncomment what you change.\n\
         # Each TUNNEL_X is also `x` in a TOML --config file and `--set x=VALUE` on the command line.\n\
         # Generated from the settings table (core/src/config/settings.rs); core/tests/it/deploy_files.rs\n\
         # fails when it is stale: LIBTUNNEL_REGENERATE=1 cargo test -p libtunnel --features cli --test it deploy_files::\n",
    );
    for (g, rows) in groups() {
        out.push_str(&format!("\n# --- {}\n", g.title()));
        for s in rows {
            out.push_str(&format!("# {}\n", s.help));
            let line = match (s.default_is_value, s.example) {
                (true, _) => format!("{}={}", s.var(), s.default),
                (false, Some(ex)) if ex.contains(['"', '{', '[', ' ']) && !ex.starts_with('<') => format!("{}='{ex}'", s.var()),
                (false, Some(ex)) => format!("{}={ex}", s.var()),
                (false, None) => format!("{}: {}", s.var(), s.default),
            };
            out.push_str(&format!("# {line}\n"));
        }
    }
    out
}

/// `docs/reference/settings.md`: the table as a reference page.
pub fn reference_page() -> String {
    let mut out = String::from(
        "# Relay settings\n\n\
         <!-- Generated from core/src/config/settings.rs; core/tests/it/deploy_files.rs fails when it is stale:\n     \
         LIBTUNNEL_REGENERATE=1 cargo test -p libtunnel --features cli --test it deploy_files:: -->\n\n\
         Every setting of `tunnel server` (and of the relay embedded in C, Python and Node). Each is set, lowest\n\
         precedence first, as `name` in a TOML `--config` file, as `TUNNEL_NAME` in `./.env`, as `TUNNEL_NAME` in the\n\
         environment (or its Emissary name where one is listed), or as `--set name=VALUE`. `tunnel server --set help`\n\
         prints the same list. *Reload*: a SIGHUP (or `Reloader::reload`) takes a new value while the relay runs; the\n\
         others wait for a restart. *Secret*: never shown by the admin endpoint's `/config`. A value outside its range\n\
         is refused at start with an error naming the setting, the value and the range.\n",
    );
    for (g, rows) in groups() {
        out.push_str(&format!("\n## {}\n\n", g.title()));
        out.push_str("| Setting | Variable | Default | Range | Reload | Secret | What |\n|---|---|---|---|---|---|---|\n");
        for s in rows {
            let var = match s.emissary {
                Some(e) => format!("`{}`, `EMISSARY_{e}`", s.var()),
                None => format!("`{}`", s.var()),
            };
            // A setting that fills a field of another name says which.
            let what = match s.field.last() {
                Some(f) if *f != s.name => format!("{} (sets `{}`)", s.help, s.field.join(".")),
                _ => s.help.to_string(),
            };
            let yes = |b: bool| if b { "yes" } else { "" };
            out.push_str(&format!(
                "| `{}` | {var} | `{}` | {} | {} | {} | {} |\n",
                s.name,
                s.default,
                s.bounds.describe(),
                yes(s.flags.reload),
                yes(s.flags.secret),
                what.replace('|', "\\|")
            ));
        }
    }
    out
}

/// The files generated from the table, by path from the repository root, with their text.
pub fn generated_files() -> Vec<(&'static str, String)> {
    vec![("deploy/relay.env.example", env_example()), ("docs/reference/settings.md", reference_page())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_parses_within_its_bounds() {
        let d = Draft::defaults();
        assert_eq!(d.cfg.listen, Some("127.0.0.1:7835".parse().expect("addr")));
        assert_eq!(d.cfg.limits.max_streams_per_session, 4096);
        assert_eq!((d.cluster.claim_ttl, d.cluster.namespace.as_str()), (Duration::from_secs(10), "libtunnel"));
        let l = Limits::default();
        assert_eq!(l.clone().clamped().max_stream_window, l.max_stream_window);
    }

    #[test]
    fn one_range_for_the_loader_and_the_clamp() {
        let s = lookup("max_stream_window").expect("row");
        for (v, ok) in [("262144", true), ("268435456", true), ("262143", false), ("268435457", false), ("0", false)] {
            let mut d = Draft::defaults();
            assert_eq!(s.apply(&mut d, v, "TUNNEL_MAX_STREAM_WINDOW").is_ok(), ok, "{v}");
        }
        let e = s.apply(&mut Draft::defaults(), "1000", "TUNNEL_MAX_STREAM_WINDOW").unwrap_err();
        assert!(
            e.message().contains("TUNNEL_MAX_STREAM_WINDOW") && e.message().contains("262144 to 268435456") && e.message().contains("\"1000\""),
            "{e}"
        );
        let l = Limits { max_stream_window: 1, http_max_header_bytes: 1, ..Limits::default() }.clamped();
        assert_eq!((l.max_stream_window, l.http_max_header_bytes), (256 * 1024, 8192));
        let l = Limits { max_stream_window: usize::MAX, handshake_timeout: Duration::MAX, ..Limits::default() }.clamped();
        assert_eq!((l.max_stream_window, l.handshake_timeout), (MAX_COUNT, Duration::from_secs_f64(MAX_SECONDS)));
    }

    #[test]
    fn names_are_unique_and_secrets_are_not_shown() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        let json = RelayConfig::new(KeySet::default(), Allowlist::default()).settings_json();
        for s in SETTINGS {
            let shown = json.get(s.name).or_else(|| json["limits"].get(s.name)).is_some();
            assert_eq!(shown, !s.flags.secret, "{}", s.name);
        }
    }
}
