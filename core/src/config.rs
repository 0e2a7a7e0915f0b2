//! Relay configuration: typed, validated, and loaded from (lowest to highest precedence) a TOML
//! file, a `.env` file in the working directory, the process environment (`TUNNEL_*`, plus
//! Emissary's `EMISSARY_*` names), and command-line flags. Every error names the setting to fix.
//! What each setting is (name, parser, default, bounds, ...) is one row of [`settings::SETTINGS`];
//! this module merges the sources and checks the rules that span several settings.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Key, KeySet};
use crate::egress::allowlist::Allowlist;
use crate::error::{Error, Result};

pub mod settings;

pub use crate::env::read_dotenv;
pub use settings::{help_table, lookup, Bounds, Limits, Setting, SETTINGS};
use settings::{ClusterDraft, Draft};

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
    /// QUIC tunnel endpoint (UDP; `quic://` clients), with the tunnel endpoint's certificate
    /// (`tls_cert`/`tls_key`, required); `None` disables it.
    pub quic_listen: Option<SocketAddr>,
    /// The congestion controller of the relay's QUIC sessions.
    pub quic_congestion: crate::transport::quic::Congestion,
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
        let mut cfg = Draft::defaults().cfg;
        cfg.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        cfg.auth_keys = auth_keys;
        cfg.allow = allow;
        cfg
    }

    /// The settings in force as typed JSON (the admin endpoint's `/config`): each setting under
    /// its name (the limits under `limits`), secrets left out.
    pub fn settings_json(&self) -> serde_json::Value {
        let (mut top, mut limits) = (serde_json::Map::new(), serde_json::Map::new());
        for s in SETTINGS.iter().filter(|s| !s.flags.secret) {
            let into = if s.field[0] == "limits" { &mut limits } else { &mut top };
            into.insert(s.name.to_string(), s.show(self));
        }
        top.insert("limits".into(), limits.into());
        top.into()
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
                if crate::env::is_client_var(var) {
                    continue;
                }
                let setting = lookup(&name.to_ascii_lowercase()).ok_or_else(|| unknown(var, "environment variable"))?;
                listen_given |= setting.name == "listen";
                values.insert(setting.name, (val.clone(), var.clone()));
            }
        }
        for (var, val) in &merged {
            if let Some(name) = var.strip_prefix("EMISSARY_") {
                // Emissary gives ports where the relay takes addresses (`EMISSARY_HTTP_PORT`).
                let (setting, value) = match SETTINGS.iter().find(|s| s.emissary == Some(name)) {
                    Some(s) if name.ends_with("_PORT") => (s.name, port_to_addr(val, var)?),
                    Some(s) => (s.name, val.clone()),
                    // Emissary ignores names it does not know, and Kubernetes injects service
                    // links (EMISSARY_PORT, EMISSARY_SERVICE_HOST, ...) into every pod of a
                    // namespace with a Service named `emissary`.
                    None if is_service_link(name) => continue,
                    None => {
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
                values.insert(setting, (value, var.clone()));
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

    /// Parse every value with its row of the table, then check the rules that span settings.
    fn from_values(values: &BTreeMap<&'static str, (String, String)>) -> Result<RelayConfig> {
        let mut d = Draft::defaults();
        for (name, (v, var)) in values {
            lookup(name).expect("values are keyed by row names").apply(&mut d, v, var)?;
        }
        let Draft { mut cfg, cluster } = d;
        let set = |k: &str| set_by(values, k);
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
        if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
            return Err(Error::config("set both TUNNEL_TLS_CERT and TUNNEL_TLS_KEY (or neither)"));
        }
        cfg.check_admin()?;
        cfg.cluster = cluster_from(cluster, values)?;
        cfg.check_serves_someone(set("auth_keys").unwrap_or("TUNNEL_AUTH_KEYS"), set("allow").unwrap_or("TUNNEL_ALLOW"))?;
        if cfg.listen.is_none() && cfg.tcp_listen.is_none() {
            return Err(Error::config("both tunnel endpoints are disabled: set TUNNEL_LISTEN (or TUNNEL_TCP_LISTEN)"));
        }
        Ok(cfg)
    }
}

impl Draft {
    /// Every setting at its default: the rows whose default is a value, parsed by their parser.
    pub(crate) fn defaults() -> Draft {
        let cfg = RelayConfig {
            listen: None,
            tcp_listen: None,
            http_listen: None,
            domain: String::new(),
            auth_keys: KeySet::default(),
            allow: Allowlist::default(),
            listener_keys: Vec::new(),
            listeners_open: false,
            exits: Vec::new(),
            tcp_ports: None,
            tcp_ports_bind: IpAddr::from([127, 0, 0, 1]),
            tls_cert: None,
            tls_key: None,
            health_path: String::new(),
            admin_listen: None,
            admin_token: None,
            dns_servers: Vec::new(),
            limits: Limits::default(),
            https_listen: None,
            quic_listen: None,
            quic_congestion: Default::default(),
            public_tls_cert: Vec::new(),
            public_tls_key: Vec::new(),
            http_path_prefix: None,
            http_listener_rate: None,
            cluster: None,
            proxy_protocol_from: Vec::new(),
        };
        let mut d = Draft { cfg, cluster: ClusterDraft::default() };
        for s in SETTINGS.iter().filter(|s| s.default_is_value) {
            s.apply(&mut d, s.default, s.name).expect("every default in the table parses (tested)");
        }
        d
    }
}

/// The cluster settings: all off unless `cluster_redis` is set, which then needs `cluster_key`.
/// `values` say which variable set a setting, if any.
fn cluster_from(c: ClusterDraft, values: &BTreeMap<&'static str, (String, String)>) -> Result<Option<ClusterConfig>> {
    let Some(redis) = c.redis else {
        for k in ["cluster_key", "cluster_advertise", "cluster_namespace", "cluster_redis_ca"] {
            if let Some(w) = set_by(values, k) {
                tracing::warn!("{w} is set but TUNNEL_CLUSTER_REDIS is not: this relay runs on its own");
            }
        }
        return Ok(None);
    };
    if let Some(ca) = &c.redis_ca {
        if !redis.starts_with("rediss://") {
            return Err(Error::config("TUNNEL_CLUSTER_REDIS_CA is set but TUNNEL_CLUSTER_REDIS is not a rediss:// (TLS) URL"));
        }
        std::fs::metadata(ca).map_err(|e| Error::config(format!("TUNNEL_CLUSTER_REDIS_CA {}: {e}", ca.display())))?;
    }
    let Some(key) = c.key else {
        return Err(Error::config(
            "TUNNEL_CLUSTER_REDIS is set but TUNNEL_CLUSTER_KEY is not: give every node the same key (KID:BASE64; `tunnel keygen --cluster` prints one); nodes authenticate each other with it",
        ));
    };
    Ok(Some(ClusterConfig { redis, redis_ca: c.redis_ca, key, advertise: c.advertise, claim_ttl: c.claim_ttl, namespace: c.namespace }))
}

/// The variable (or file key, or flag) that set the setting `k`, if any.
fn set_by<'a>(values: &'a BTreeMap<&'static str, (String, String)>, k: &str) -> Option<&'a str> {
    values.get(k).map(|(_, w)| w.as_str())
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
