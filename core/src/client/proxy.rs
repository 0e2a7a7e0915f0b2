//! Upstream proxies: which proxy, if any, a client's connection to each relay crosses (a
//! corporate or CI proxy), stored in each [`RelayUrl`]'s `proxy`; the tunnel through it is
//! opened under the transport, by `transport::proxy` (HTTP CONNECT, HTTPS, SOCKS5), and TLS and
//! WebSocket run over it as on a direct connection.
//!
//! Which proxy, if any, follows curl's rules ([`ProxyRules`]): an explicit choice (`--proxy`,
//! the builders' `proxy`, `TUNNEL_PROXY`) wins, `none` turns proxies off; otherwise
//! `https_proxy`/`HTTPS_PROXY` for `wss://` relays, `http_proxy`/`HTTP_PROXY` for `ws://`,
//! then `all_proxy`/`ALL_PROXY` (the only one for `tcp://`); `no_proxy`/`NO_PROXY` lists hosts
//! that are reached directly. The lower-case name wins over the upper-case one, as in curl.
//!
//! SOCKS5 always sends the relay's host name to the proxy (remote DNS, `socks5h` in curl's
//! terms), since a network that only lets the proxy out often cannot resolve outside names
//! either. The SOCKS5 messages are `socks5-proto`'s (already used by the relay's SOCKS5 side);
//! HTTP CONNECT is a dozen lines of HTTP/1.1 written here. Proxy passwords never appear in logs
//! or errors: a [`ProxyUrl`] prints itself without it.

use std::net::IpAddr;
use std::sync::Arc;

pub use crate::env::PROXY_VAR;
use crate::env::{ClientEnv, ClientVar, PROXY_ROW};
use crate::error::{Error, ErrorCode, Result};
pub use crate::transport::proxy::{ProxyKind, ProxyUrl};
use crate::transport::{RelayUrl, Scheme};

/// `TUNNEL_PROXY`: the proxy every client uses (`http://`, `https://`, `socks5://` URL, or `none`).

/// The conventional variables, in the order they are looked up (lower case first, as curl).
const HTTPS_NAMES: &[&str] = &["https_proxy", "HTTPS_PROXY"];
const HTTP_NAMES: &[&str] = &["http_proxy", "HTTP_PROXY"];
const ALL_NAMES: &[&str] = &["all_proxy", "ALL_PROXY"];
const NO_NAMES: &[&str] = &["no_proxy", "NO_PROXY"];

/// Which proxy a client uses: the one [`ProxyRules`] pick from the environment (the default),
/// none, or this one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Proxy {
    /// `TUNNEL_PROXY`, else the conventional variables, with `NO_PROXY` (the default).
    #[default]
    Environment,
    /// Connect directly, whatever the environment says (`--proxy none`).
    Off,
    /// This proxy for every relay (except `NO_PROXY` hosts).
    Url(ProxyUrl),
}

impl Proxy {
    /// `none` (or an empty text) turns proxies off; anything else is a proxy URL.
    pub fn parse(text: &str) -> Result<Proxy> {
        let t = text.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("none") {
            Ok(Proxy::Off)
        } else {
            ProxyUrl::parse(t).map(Proxy::Url)
        }
    }
}

/// The proxy settings of one client, read once: the explicit choice, the conventional
/// variables and the hosts reached directly. [`ProxyRules::for_relay`] picks per relay URL.
#[derive(Debug, Clone, Default)]
pub struct ProxyRules {
    explicit: Option<Proxy>,
    https: Option<ProxyUrl>,
    http: Option<ProxyUrl>,
    all: Option<ProxyUrl>,
    no_proxy: Vec<NoProxy>,
}

impl ProxyRules {
    /// Read the rules: `choice` if it is not [`Proxy::Environment`], else `TUNNEL_PROXY`; the
    /// conventional variables and `NO_PROXY` from `env`. A malformed URL names its variable (but
    /// not its text, which may hold a password).
    pub fn resolve(choice: &Proxy, env: &ClientEnv) -> Result<ProxyRules> {
        fn bad(var: &str) -> impl Fn(Error) -> Error + '_ {
            move |e: Error| Error::new(ErrorCode::InvalidConfig, format!("{var}: {}", e.message()))
        }
        let explicit = match choice {
            Proxy::Environment => match env.var(&PROXY_ROW)? {
                Some(v) => Some(Proxy::parse(&v).map_err(bad(PROXY_VAR))?),
                None => None,
            },
            other => Some(other.clone()),
        };
        let mut rules = ProxyRules { explicit, ..Default::default() };
        let read = |names: &[&'static str]| -> Result<Option<ProxyUrl>> {
            for n in names {
                if let Some(v) = env.var(&ClientVar { name: n, help: "", old_names: &[] })? {
                    if v.trim().is_empty() {
                        continue;
                    }
                    return ProxyUrl::parse(&v).map(Some).map_err(bad(n));
                }
            }
            Ok(None)
        };
        if rules.explicit.is_none() {
            rules.https = read(HTTPS_NAMES)?;
            rules.http = read(HTTP_NAMES)?;
            rules.all = read(ALL_NAMES)?;
        }
        for n in NO_NAMES {
            if let Some(v) = env.var(&ClientVar { name: n, help: "", old_names: &[] })? {
                rules.no_proxy = v.split(',').filter_map(NoProxy::parse).collect();
                break;
            }
        }
        Ok(rules)
    }

    /// The proxy to reach `relay` through, or `None` for a direct connection. The conventional
    /// variables never apply to loopback relays (a proxy would reach its own loopback, not
    /// ours); an explicit proxy does.
    pub fn for_relay(&self, relay: &RelayUrl) -> Option<ProxyUrl> {
        if self.no_proxy.iter().any(|n| n.matches(&relay.host, relay.port)) {
            return None;
        }
        match &self.explicit {
            Some(Proxy::Url(p)) => return Some(p.clone()),
            Some(_) => return None,
            None => {}
        }
        if is_loopback(&relay.host) {
            return None;
        }
        let by_scheme = match relay.scheme {
            Scheme::Wss | Scheme::Grpcs => self.https.as_ref(),
            Scheme::Ws | Scheme::Grpc => self.http.as_ref(),
            // UDP: neither HTTP CONNECT nor SOCKS5 CONNECT carries it.
            Scheme::Tcp | Scheme::Quic => None,
        };
        by_scheme.or(self.all.as_ref()).cloned()
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoProxy {
    /// `*`: every host.
    All,
    /// A host name: itself and its subdomains (`example.com`, `.example.com`), optionally one port.
    Domain(String, Option<u16>),
    /// An address or a network (`10.0.0.0/8`, `::1`), optionally one port.
    Net(ipnet::IpNet, Option<u16>),
}

impl NoProxy {
    fn parse(entry: &str) -> Option<NoProxy> {
        let e = entry.trim();
        if e.is_empty() {
            return None;
        }
        if e == "*" {
            return Some(NoProxy::All);
        }
        if let Ok(net) = e.parse::<ipnet::IpNet>() {
            return Some(NoProxy::Net(net, None));
        }
        if let Ok(ip) = e.parse::<IpAddr>() {
            return Some(NoProxy::Net(ip.into(), None));
        }
        // host:port, [v6]:port, [v6]
        let (host, port) = match e.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => match p.parse::<u16>() {
                Ok(p) => (h, Some(p)),
                Err(_) => return None,
            },
            _ => (e, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(NoProxy::Net(ip.into(), port));
        }
        let domain = host.trim_start_matches("*.").trim_start_matches('.').trim_end_matches('.').to_ascii_lowercase();
        (!domain.is_empty()).then_some(NoProxy::Domain(domain, port))
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        match self {
            NoProxy::All => true,
            NoProxy::Net(net, p) => p.map_or(true, |p| p == port) && host.parse::<IpAddr>().is_ok_and(|ip| net.contains(&ip)),
            NoProxy::Domain(d, p) => {
                let h = host.trim_end_matches('.').to_ascii_lowercase();
                p.map_or(true, |p| p == port) && (h == *d || h.strip_suffix(d.as_str()).is_some_and(|rest| rest.ends_with('.')))
            }
        }
    }
}

/// Attach to every relay URL the proxy `rules` pick for it.
pub(crate) fn apply(urls: &mut [RelayUrl], rules: &ProxyRules) {
    for u in urls {
        u.proxy = rules.for_relay(u).map(Arc::new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> ClientEnv {
        ClientEnv::Fixed(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn pick(rules: &ProxyRules, relay: &str) -> Option<String> {
        rules.for_relay(&RelayUrl::parse(relay).unwrap()).map(|p| p.address())
    }

    #[test]
    fn curl_rules_pick_the_proxy() {
        let r = ProxyRules::resolve(
            &Proxy::Environment,
            &env(&[
                ("HTTPS_PROXY", "http://upper:1"),
                ("https_proxy", "http://lower:2"),
                ("http_proxy", "http://h:3"),
                ("ALL_PROXY", "socks5://a:4"),
            ]),
        )
        .unwrap();
        assert_eq!(pick(&r, "wss://relay.example").as_deref(), Some("lower:2"));
        assert_eq!(pick(&r, "ws://relay.example").as_deref(), Some("h:3"));
        assert_eq!(pick(&r, "tcp://relay.example:9").as_deref(), Some("a:4"));
        // The conventional variables skip loopback relays.
        assert_eq!(pick(&r, "ws://127.0.0.1:1"), None);
        assert_eq!(pick(&r, "ws://localhost:1"), None);
        // TUNNEL_PROXY wins, loopback included; `none` turns everything off.
        let r = ProxyRules::resolve(&Proxy::Environment, &env(&[("TUNNEL_PROXY", "socks5://t:5"), ("https_proxy", "http://x:1")])).unwrap();
        assert_eq!(pick(&r, "wss://relay.example").as_deref(), Some("t:5"));
        assert_eq!(pick(&r, "ws://127.0.0.1:1").as_deref(), Some("t:5"));
        let r = ProxyRules::resolve(&Proxy::Environment, &env(&[("TUNNEL_PROXY", "none"), ("https_proxy", "http://x:1")])).unwrap();
        assert_eq!(pick(&r, "wss://relay.example"), None);
        // An explicit choice wins over TUNNEL_PROXY.
        let r = ProxyRules::resolve(&Proxy::Off, &env(&[("TUNNEL_PROXY", "socks5://t:5")])).unwrap();
        assert_eq!(pick(&r, "wss://relay.example"), None);
        // A bad variable names itself, not its password.
        let e = ProxyRules::resolve(&Proxy::Environment, &env(&[("https_proxy", "gopher://u:hunter2@x")])).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidConfig);
        assert!(e.message().starts_with("https_proxy:") && !e.message().contains("hunter2"), "{e}");
    }

    #[test]
    fn no_proxy_matches_hosts_suffixes_cidrs_ports_and_star() {
        let rules = |no: &str| ProxyRules::resolve(&Proxy::Environment, &env(&[("TUNNEL_PROXY", "http://p:1"), ("NO_PROXY", no)])).unwrap();
        let r = rules("example.com, .corp.internal,10.0.0.0/8, 192.168.1.5,relay.test:8443,[::1]:9");
        for direct in [
            "wss://example.com",
            "wss://a.b.example.com",
            "ws://corp.internal",
            "ws://x.corp.internal",
            "ws://10.2.3.4",
            "ws://192.168.1.5:80",
            "wss://relay.test:8443",
            "ws://[::1]:9",
        ] {
            assert_eq!(pick(&r, direct), None, "{direct}");
        }
        for proxied in ["wss://notexample.com", "wss://example.com.evil", "ws://11.0.0.1", "wss://relay.test", "ws://[::1]:10"] {
            assert_eq!(pick(&r, proxied).as_deref(), Some("p:1"), "{proxied}");
        }
        assert_eq!(pick(&rules("*"), "wss://anything.example"), None);
        // no_proxy (lower case) wins over NO_PROXY.
        let r = ProxyRules::resolve(&Proxy::Environment, &env(&[("TUNNEL_PROXY", "http://p:1"), ("NO_PROXY", "a.test"), ("no_proxy", "b.test")]))
            .unwrap();
        assert_eq!(pick(&r, "ws://a.test").as_deref(), Some("p:1"));
        assert_eq!(pick(&r, "ws://b.test"), None);
    }
}
