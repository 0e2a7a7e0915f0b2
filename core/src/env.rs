//! What the relay's settings (`config`) and the clients' options (`client::config`) both read, in
//! a leaf so that neither imports the other: `./.env` files (through [`crate::dotenv`]), the
//! table of client variables (which the relay tolerates in a shared environment), where a client
//! reads them from ([`ClientEnv`]), and the numeric checks every duration and count passes.

use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

/// Read a `.env` file if present, as Emissary (godotenv) reads it ([`crate::dotenv`]); a
/// malformed file is an error naming the line.
pub fn read_dotenv(path: &Path) -> Result<Vec<(String, String)>> {
    crate::dotenv::read(path).map_err(|e| Error::config(e.to_string()))
}

/// The longest timeout any face or setting accepts (30 days): a larger one would overflow the
/// deadlines computed from it (`now + timeout`).
pub const MAX_SECONDS: f64 = 30.0 * 24.0 * 3600.0;

/// The largest count setting: below tokio's semaphore limit on 32- and 64-bit targets.
pub const MAX_COUNT: usize = 1 << 28;

/// Seconds given by a caller (a flag, a keyword argument, an option in milliseconds / 1000, a
/// relay setting) as a `Duration`: refuses NaN, negative, infinite, absurd (over 30 days) values
/// and ones under a millisecond (which would time everything out) with `INVALID_ARGUMENT`, where
/// `Duration::from_secs_f64` would panic.
pub fn checked_seconds(what: &str, secs: f64) -> Result<Duration> {
    if secs.is_finite() && (0.001..=MAX_SECONDS).contains(&secs) {
        return Ok(Duration::from_secs_f64(secs));
    }
    Err(Error::argument(format!("{what} must be a positive number of seconds, from 0.001 to {MAX_SECONDS} (30 days); got {secs}")))
}

/// Milliseconds given by a caller (Node's options) as a `Duration`, with [`checked_seconds`]'s
/// rules and a message in milliseconds.
pub fn checked_millis(what: &str, ms: f64) -> Result<Duration> {
    checked_seconds(what, ms / 1000.0).map_err(|_| {
        Error::argument(format!("{what} must be a positive number of milliseconds, from 1 to {} (30 days); got {ms}", MAX_SECONDS * 1000.0))
    })
}

/// One client environment variable.
#[derive(Debug, Clone, Copy)]
pub struct ClientVar {
    /// The name (`TUNNEL_RELAY`).
    pub name: &'static str,
    /// What it holds, for help texts.
    pub help: &'static str,
    /// Older names still read, with a deprecation warning.
    pub old_names: &'static [&'static str],
}

/// `TUNNEL_RELAY`: the relay URL.
pub const RELAY_VAR: &str = "TUNNEL_RELAY";
/// `TUNNEL_KEY`: a dialer's shared key.
pub const KEY_VAR: &str = "TUNNEL_KEY";
/// `TUNNEL_LISTENER_KEY`: a listener's Ed25519 key.
pub const LISTENER_KEY_VAR: &str = "TUNNEL_LISTENER_KEY";
/// `TUNNEL_CA`: CA certificates for `wss://`.
pub const CA_VAR: &str = "TUNNEL_CA";
/// `TUNNEL_TIMEOUT`: seconds one dial or registration may take.
pub const TIMEOUT_VAR: &str = "TUNNEL_TIMEOUT";
/// `TUNNEL_MODE`: `multiplexed` or `classic`.
pub const MODE_VAR: &str = "TUNNEL_MODE";
/// `TUNNEL_WORKER_THREADS`: worker threads of the runtime (see [`crate::runtime`]).
pub const WORKER_THREADS_VAR: &str = "TUNNEL_WORKER_THREADS";
/// `TUNNEL_PROXY`: the upstream proxy to reach the relay through (see [`crate::client::proxy`]).
pub const PROXY_VAR: &str = "TUNNEL_PROXY";

/// `TUNNEL_PROXY`'s row in the client variable table.
pub const PROXY_ROW: ClientVar = ClientVar {
    name: PROXY_VAR,
    help: "proxy to reach the relay through: http://[user:pass@]host:port, https://…, socks5://…, or none",
    old_names: &[],
};

/// The conventional proxy variables' rows (each also read in lower case, which wins).
pub const CONVENTIONAL_PROXY_ROWS: [ClientVar; 4] = [
    ClientVar { name: "HTTPS_PROXY", help: "proxy for wss:// and grpcs:// relays (https_proxy wins), unless TUNNEL_PROXY is set", old_names: &[] },
    ClientVar { name: "HTTP_PROXY", help: "proxy for ws:// and grpc:// relays (http_proxy wins), unless TUNNEL_PROXY is set", old_names: &[] },
    ClientVar { name: "ALL_PROXY", help: "proxy for relays the two above do not cover, tcp:// ones included (all_proxy wins)", old_names: &[] },
    ClientVar {
        name: "NO_PROXY",
        help: "relays reached directly: host names (with their subdomains), .suffixes, IPs, CIDRs, host:port, or * (no_proxy wins)",
        old_names: &[],
    },
];

/// Every variable a client reads, in every face.
pub const CLIENT_VARS: &[ClientVar] = &[
    ClientVar {
        name: RELAY_VAR,
        help: "relay URL: ws://, wss://, tcp://, grpc://, grpcs:// or quic://; several, comma-separated, in order of preference",
        old_names: &[],
    },
    ClientVar { name: KEY_VAR, help: "a dialer's shared key KID:BASE64, or a file holding it (`tunnel keygen`)", old_names: &[] },
    ClientVar {
        name: LISTENER_KEY_VAR,
        help: "a listener's Ed25519 key: a PEM file or its text (`tunnel keygen --listener --out FILE`)",
        old_names: &[],
    },
    ClientVar {
        name: CA_VAR,
        help: "PEM file of CA certificates to trust for wss://, grpcs:// and quic:// (default: the public Web PKI)",
        old_names: &[],
    },
    ClientVar { name: TIMEOUT_VAR, help: "seconds one dial or listener registration may take (default 20)", old_names: &[] },
    ClientVar { name: MODE_VAR, help: "multiplexed (default) or classic (Emissary's one connection per stream)", old_names: &[] },
    ClientVar {
        name: WORKER_THREADS_VAR,
        help: "worker threads of libtunnel's runtime (default: one per core; CLI client commands: 1)",
        old_names: &["LIBTUNNEL_WORKER_THREADS"],
    },
    PROXY_ROW,
    CONVENTIONAL_PROXY_ROWS[0],
    CONVENTIONAL_PROXY_ROWS[1],
    CONVENTIONAL_PROXY_ROWS[2],
    CONVENTIONAL_PROXY_ROWS[3],
];

/// Whether `var` is one a client reads (current or old name): the relay ignores these.
pub fn is_client_var(var: &str) -> bool {
    CLIENT_VARS.iter().any(|v| v.name == var || v.old_names.contains(&var))
}

/// Where environment variables come from: the process environment and `./.env`, or a fixed list
/// (tests, and faces that were told not to read the environment).
#[derive(Debug, Clone, Default)]
pub enum ClientEnv {
    /// The process environment, then `./.env` in the working directory.
    #[default]
    Process,
    /// Only these pairs.
    Fixed(Vec<(String, String)>),
    /// No environment at all: explicit values only.
    None,
}

impl ClientEnv {
    fn lookup(&self, names: &[&str]) -> Result<Option<(String, String)>> {
        let pairs = match self {
            ClientEnv::None => return Ok(None),
            ClientEnv::Fixed(p) => p.clone(),
            ClientEnv::Process => {
                let mut p: Vec<(String, String)> = crate::env::read_dotenv(Path::new(".env"))?;
                // The real environment wins over .env: later pairs are found first below.
                p.extend(std::env::vars());
                p
            }
        };
        for name in names {
            if let Some((k, v)) = pairs.iter().rev().find(|(k, _)| k == name) {
                return Ok(Some((k.clone(), v.clone())));
            }
        }
        Ok(None)
    }

    /// The value of `var` (or one of its old names, with a deprecation warning).
    pub fn var(&self, var: &ClientVar) -> Result<Option<String>> {
        let mut names = vec![var.name];
        names.extend_from_slice(var.old_names);
        match self.lookup(&names)? {
            Some((k, v)) => {
                if k != var.name {
                    tracing::warn!("{k} is deprecated and will stop working in the next release; set {} instead", var.name);
                }
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }
}
