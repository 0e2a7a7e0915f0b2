//! The relay's allowlist: typed rules and the single place that decides whether a stream may
//! connect to a target.
//!
//! A rule is `{"host": H, "port": P}`. `H` is an exact name (`db.internal`, compared
//! case-insensitively, trailing dot ignored), a wildcard (`*.db.internal` matches names below it,
//! `*` matches any host), an IP address or a CIDR. `P` is a port, a `"lo-hi"` range or `"*"`. These
//! are a superset of Emissary's exact `{host, port}` entries.
//!
//! Name rules are matched against the requested name; IP and CIDR rules against every address the
//! relay would actually connect to, after DNS. Targets whose "name" is really an IP in another
//! spelling (`2130706433`, `0x7f.1`, `::ffff:127.0.0.1`) are normalised to that IP first, so they
//! meet the IP rules and never a name rule.
//!
//! A name rule admits a name, not every address DNS may return for it: [`name_rule_reaches`]
//! keeps the relay host itself and the cloud metadata services out of reach of a hostile DNS
//! answer, and IPv6 addresses that embed an IPv4 address ([`embedded_ipv4`]) are judged as the
//! IPv4 address they carry, by name rules and IP rules alike.
//!
//! Special addresses ([`special_address`]: loopback, link-local `169.254.0.0/16` and `fe80::/10`,
//! the cloud metadata services, the relay host's own addresses) are reached by an IP rule only
//! when that rule names the address exactly (`127.0.0.1`, `169.254.169.254/32`): a broad rule such
//! as `0.0.0.0/0`, `::/0`, `10.0.0.0/8` or `*` means "the network", never the host itself or the
//! cloud's credential endpoint. [`Allowlist::broad_rule_notes`] says at start-up what each broad
//! rule leaves out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{Error, Result};

/// What a target host is after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    /// A DNS name, lowercase ASCII (IDNA applied), no trailing dot.
    Name(String),
    /// An IP address (IPv4-mapped IPv6 is turned into IPv4).
    Ip(IpAddr),
}

impl TargetHost {
    /// Normalise a requested host name. Fails on names that cannot be valid hosts.
    pub fn parse(raw: &str) -> Result<TargetHost> {
        let trimmed = raw.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(raw);
        if let Ok(ip) = IpAddr::from_str(trimmed) {
            return Ok(TargetHost::Ip(canonical_ip(ip)));
        }
        let host = raw.strip_suffix('.').unwrap_or(raw);
        if host.is_empty() || host.len() > 253 {
            return Err(Error::argument(format!("target host {raw:?} is not a valid host name")));
        }
        match url::Host::parse(host) {
            // The parser keeps empty labels (`..`, `a..b`, `127.0.0.1..`); no resolvable name has
            // one, and trimming them would turn `127.0.0.1..` into a "name" that is an IP.
            Ok(url::Host::Domain(d)) => {
                let d = d.strip_suffix('.').unwrap_or(&d);
                if d.split('.').any(str::is_empty) {
                    return Err(Error::argument(format!("target host {raw:?} is not a valid host name (empty label)")));
                }
                // IDNA can lengthen a name past DNS limits (the raw length was checked above).
                if d.len() > 253 || d.split('.').any(|l| l.len() > 63) {
                    return Err(Error::argument(format!("target host {raw:?} is longer than a DNS name may be")));
                }
                Ok(TargetHost::Name(d.to_string()))
            }
            Ok(url::Host::Ipv4(ip)) => Ok(TargetHost::Ip(IpAddr::V4(ip))),
            Ok(url::Host::Ipv6(ip)) => Ok(TargetHost::Ip(canonical_ip(IpAddr::V6(ip)))),
            Err(e) => Err(Error::argument(format!("target host {raw:?} is not a valid host name ({e})"))),
        }
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes the IPv4 address it names.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The IPv4 address an IPv6 address carries, with the length of the prefix that says so:
/// IPv4-mapped `::ffff:a.b.c.d` (96), IPv4-translated `::ffff:0:a.b.c.d` (96), IPv4-compatible
/// `::a.b.c.d` (96; not `::` or `::1`), NAT64 `64:ff9b::/96` and the local-use `64:ff9b:1::/48`
/// (last 32 bits), 6to4 `2002:AABB:CCDD::/16`, and Teredo `2001::/32` (its client address, the
/// last 32 bits inverted).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<(Ipv4Addr, u8)> {
    let s = v6.segments();
    let low = Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((low, 96)),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some((low, 96)),
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some((low, 96)),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((low, 96)),
        [0x64, 0xff9b, 1, ..] => Some((low, 48)),
        [0x2002, a, b, ..] => Some((Ipv4Addr::from((u32::from(a) << 16) | u32::from(b)), 16)),
        [0x2001, 0, ..] => Some((Ipv4Addr::from(!u32::from(low)), 32)),
        _ => None,
    }
}

/// Cloud metadata services: AWS, GCP (`metadata.google.internal`), Azure, DigitalOcean and others
/// at 169.254.169.254, AWS ECS task metadata at 169.254.170.2, AWS's IPv6 endpoint, Alibaba's,
/// Oracle's and Tencent's.
pub const METADATA_ADDRESSES: [IpAddr; 6] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 0, 23)),
];

/// Whether a name rule may connect the relay to `ip` (a resolved address). Never: the
/// unspecified address, broadcast and multicast, the cloud metadata addresses, and the relay
/// host's own interface addresses (`host`); loopback and link-local only for a rule that names
/// the host exactly (`exact`, e.g. `localhost:5432`), never for a `*.suffix` wildcard. An IPv6
/// address embedding an IPv4 address is judged as that IPv4 address. Everything else: yes.
/// (IP and CIDR rules are separate: a rule naming such an address admits it.)
pub fn name_rule_reaches(ip: IpAddr, exact: bool, host: &[IpAddr]) -> bool {
    let ip = canonical_ip(ip);
    if let IpAddr::V6(v6) = ip {
        if let Some((v4, _)) = embedded_ipv4(v6) {
            return name_rule_reaches(IpAddr::V4(v4), exact, host);
        }
    }
    if ip.is_unspecified() || ip.is_multicast() || METADATA_ADDRESSES.contains(&ip) {
        return false;
    }
    let local = match ip {
        IpAddr::V4(v4) => v4.is_broadcast() || (v4.is_loopback() || v4.is_link_local()) && !exact,
        IpAddr::V6(v6) => (v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80) && !exact,
    };
    !local && (ip.is_loopback() || !host.contains(&ip))
}

/// Why `ip` is a special address, which only an IP rule naming it exactly (a `/32` or `/128`)
/// reaches; `None` for an ordinary address. `host` is the relay host's own addresses. An IPv6
/// address embedding an IPv4 address is judged as that IPv4 address.
pub fn special_address(ip: IpAddr, host: &[IpAddr]) -> Option<&'static str> {
    let ip = canonical_ip(ip);
    if let IpAddr::V6(v6) = ip {
        if let Some((v4, _)) = embedded_ipv4(v6) {
            if let Some(why) = special_address(IpAddr::V4(v4), host) {
                return Some(why);
            }
        }
    }
    if METADATA_ADDRESSES.contains(&ip) {
        return Some("a cloud metadata service");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => return Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => return Some("link-local (169.254.0.0/16, where cloud metadata services live)"),
        IpAddr::V6(v6) if v6.is_loopback() => return Some("loopback"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => return Some("link-local (fe80::/10)"),
        _ => {}
    }
    host.contains(&ip).then_some("an address of the relay host itself")
}

/// The special ranges a broad rule leaves out, as printed at start-up.
const SPECIAL_RANGES: [&str; 6] = [
    "127.0.0.0/8",
    "::1",
    "169.254.0.0/16 (169.254.169.254 and the other cloud metadata services)",
    "fe80::/10",
    "fd00:ec2::254, 100.100.100.200, 192.0.0.192 (cloud metadata)",
    "this host's own addresses",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Any,
    Exact(String),
    /// `*.suffix`: stored as `.suffix`.
    Suffix(String),
    Net(IpNet),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortRule {
    lo: u16,
    hi: u16,
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostRule,
    port: PortRule,
    text: String,
}

/// A rule as written in JSON/TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Host pattern.
    pub host: String,
    /// Port, range or `*`.
    pub port: PortSpec,
}

/// A port as written: a number or a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// `5432`
    Number(u32),
    /// `"5432"`, `"5000-6000"`, `"*"`
    Text(String),
}

impl Rule {
    /// Build a rule from its written form; errors say what is wrong with the rule.
    pub fn from_spec(spec: &RuleSpec) -> Result<Rule> {
        let text = format!(
            "{}:{}",
            spec.host,
            match &spec.port {
                PortSpec::Number(n) => n.to_string(),
                PortSpec::Text(t) => t.clone(),
            }
        );
        let bad = |why: &str| Error::config(format!("allow rule {text:?}: {why}"));
        let port = match &spec.port {
            PortSpec::Number(n) => {
                let p = u16::try_from(*n).ok().filter(|p| *p != 0).ok_or_else(|| bad("port must be 1-65535"))?;
                PortRule { lo: p, hi: p }
            }
            PortSpec::Text(t) if t.trim() == "*" => PortRule { lo: 1, hi: 65535 },
            PortSpec::Text(t) => {
                let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p != 0);
                let (lo, hi) = match t.split_once('-') {
                    Some((a, b)) => (parse(a), parse(b)),
                    None => (parse(t), parse(t)),
                };
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo <= hi => PortRule { lo, hi },
                    _ => return Err(bad("port must be 1-65535, a range like \"5000-6000\", or \"*\"")),
                }
            }
        };
        let h = spec.host.trim();
        let host = if h == "*" {
            HostRule::Any
        } else if let Some(suffix) = h.strip_prefix("*.") {
            match TargetHost::parse(suffix) {
                Ok(TargetHost::Name(n)) => HostRule::Suffix(format!(".{n}")),
                _ => return Err(bad("a wildcard must be followed by a domain name, as in *.db.internal")),
            }
        } else if h.contains('/') {
            let net = IpNet::from_str(h).map_err(|_| bad("not a valid CIDR such as 10.0.0.0/8"))?;
            HostRule::Net(net.trunc())
        } else {
            match TargetHost::parse(h) {
                Ok(TargetHost::Ip(ip)) => HostRule::Net(IpNet::from(ip)),
                Ok(TargetHost::Name(n)) => HostRule::Exact(n),
                Err(_) => return Err(bad("host is not a name, IP, CIDR or wildcard")),
            }
        };
        Ok(Rule { host, port, text })
    }

    fn port_ok(&self, port: u16) -> bool {
        self.port.lo <= port && port <= self.port.hi
    }

    fn is_ip_rule(&self) -> bool {
        matches!(self.host, HostRule::Net(_) | HostRule::Any)
    }

    /// Whether this IP rule admits `ip` (canonical, not embedding an IPv4 address): an ordinary
    /// address by any rule containing it, a special one (`special`) only by a rule naming it
    /// exactly.
    fn admits_ip(&self, ip: IpAddr, special: bool) -> bool {
        match &self.host {
            HostRule::Any => !special,
            HostRule::Net(net) => net.contains(&ip) && (!special || net.prefix_len() == net.max_prefix_len()),
            _ => false,
        }
    }

    /// Whether this rule is an IP rule wide enough to contain a special address (`*`, or a CIDR
    /// wider than one address that contains one of the special ranges or `host`).
    fn is_broad(&self, host: &[IpAddr]) -> bool {
        match &self.host {
            HostRule::Any => true,
            HostRule::Net(net) if net.prefix_len() < net.max_prefix_len() => {
                let probes = [
                    "127.0.0.1",
                    "::1",
                    "169.254.169.254",
                    "169.254.0.1",
                    "fe80::1",
                    "fd00:ec2::254",
                    "100.100.100.200",
                    "192.0.0.192",
                    "169.254.170.2",
                ];
                probes.iter().filter_map(|p| p.parse::<IpAddr>().ok()).chain(host.iter().copied()).any(|ip| net.contains(&ip))
                    || [("127.0.0.0", 8), ("169.254.0.0", 16), ("fe80::", 10)]
                        .iter()
                        .filter_map(|(a, l)| IpNet::new(a.parse().ok()?, *l).ok())
                        .any(|special| special.contains(net))
            }
            _ => false,
        }
    }
}

/// How a name target fares before DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameDecision {
    /// A name rule admits it: connect to whatever it resolves to.
    Allowed,
    /// No name rule admits it, but IP rules might admit what it resolves to.
    CheckAddresses,
    /// Nothing could admit it: refuse without a DNS lookup.
    Denied,
}

/// The relay's allowlist.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

impl Allowlist {
    /// From rules.
    pub fn new(rules: Vec<Rule>) -> Allowlist {
        Allowlist { rules }
    }

    /// Parse a JSON list of `{"host", "port"}` (the `TUNNEL_ALLOW` / `EMISSARY_ALLOWED_PROXY_TARGETS` form).
    pub fn from_json(json: &str, var: &str) -> Result<Allowlist> {
        let specs: Vec<RuleSpec> = serde_json::from_str(json)
            .map_err(|e| Error::config(format!("{var} must be a JSON list like [{{\"host\": \"db.internal\", \"port\": 5432}}]: {e}")))?;
        Ok(Allowlist::new(specs.iter().map(Rule::from_spec).collect::<Result<_>>()?))
    }

    /// How many rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule exists.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decide for a normalised name before any DNS lookup.
    pub fn check_name(&self, name: &str, port: u16) -> NameDecision {
        let mut maybe = false;
        for r in self.rules.iter().filter(|r| r.port_ok(port)) {
            match &r.host {
                HostRule::Any => return NameDecision::Allowed,
                HostRule::Exact(n) if n == name => return NameDecision::Allowed,
                HostRule::Suffix(s) if name.ends_with(s.as_str()) => return NameDecision::Allowed,
                HostRule::Net(_) => maybe = true,
                _ => {}
            }
        }
        if maybe {
            NameDecision::CheckAddresses
        } else {
            NameDecision::Denied
        }
    }

    /// Whether a rule names exactly this host (not through a `*.suffix` or `*` wildcard).
    pub fn names_exactly(&self, name: &str, port: u16) -> bool {
        self.rules.iter().any(|r| r.port_ok(port) && matches!(&r.host, HostRule::Exact(n) if n == name))
    }

    /// Whether an address (as it will be connected) is admitted by an IP or CIDR rule. The
    /// unspecified address (`0.0.0.0`, `::`) never is, whatever the rules: connecting to it
    /// reaches the relay's own host, like loopback. An IPv6 address embedding an IPv4 address is
    /// admitted as that IPv4 address, or by a rule inside its translation prefix (such as
    /// `64:ff9b::/96`), never by a wider IPv6 rule such as `::/0`.
    ///
    /// A special address ([`special_address`]: loopback, link-local, cloud metadata, the relay
    /// host's own addresses, which this reads with [`super::resolve::host_addresses`]) is admitted
    /// only by a rule naming it exactly: `0.0.0.0/0`, `::/0` and `*` never reach it.
    pub fn ip_allowed(&self, ip: IpAddr, port: u16) -> bool {
        self.ip_allowed_on(ip, port, &super::resolve::host_addresses())
    }

    /// [`Allowlist::ip_allowed`] with the relay host's addresses given (`host`).
    pub fn ip_allowed_on(&self, ip: IpAddr, port: u16, host: &[IpAddr]) -> bool {
        let ip = canonical_ip(ip);
        if ip.is_unspecified() {
            return false;
        }
        let special = special_address(ip, host).is_some();
        if let IpAddr::V6(v6) = ip {
            if let Some((v4, prefix)) = embedded_ipv4(v6) {
                let named = self.rules.iter().filter(|r| r.port_ok(port)).any(|r| match &r.host {
                    HostRule::Net(net) => net.prefix_len() >= prefix && net.contains(&ip) && (!special || net.prefix_len() == 128),
                    _ => false,
                });
                return named || self.ip_allowed_on(IpAddr::V4(v4), port, host);
            }
        }
        self.rules.iter().filter(|r| r.port_ok(port) && r.is_ip_rule()).any(|r| r.admits_ip(ip, special))
    }

    /// One line per broad IP rule (`*`, `0.0.0.0/0`, `::/0`, a CIDR containing loopback,
    /// link-local, metadata or one of `host`) saying which special addresses it does not reach,
    /// for the start-up log.
    pub fn broad_rule_notes(&self, host: &[IpAddr]) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.is_broad(host))
            .map(|r| {
                format!(
                    "allow rule {:?} does not reach {}; a rule naming one such address exactly (like 127.0.0.1:5432 or 169.254.169.254/32:80) reaches it",
                    r.text,
                    SPECIAL_RANGES.join(", ")
                )
            })
            .collect()
    }

    /// Whether a rule may reach an address the relay host has (any rule but one naming a single
    /// address): then the host's addresses must be known to keep them out.
    pub fn needs_host_addresses(&self) -> bool {
        self.rules.iter().any(|r| !matches!(&r.host, HostRule::Net(net) if net.prefix_len() == net.max_prefix_len()))
    }

    /// The rules as written, for logs and error messages.
    pub fn describe(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.text.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(json: &str) -> Allowlist {
        Allowlist::from_json(json, "TUNNEL_ALLOW").unwrap()
    }

    #[test]
    fn exact_wildcard_cidr_and_ranges() {
        let a = list(
            r#"[{"host":"db.internal","port":5432},{"host":"*.svc.local","port":"8000-8100"},
                {"host":"10.1.0.0/16","port":"*"},{"host":"192.168.1.5","port":"22"}]"#,
        );
        let cases: &[(&str, u16, NameDecision)] = &[
            ("db.internal", 5432, NameDecision::Allowed),
            ("db.internal", 5433, NameDecision::CheckAddresses),
            ("a.svc.local", 8050, NameDecision::Allowed),
            ("a.b.svc.local", 8000, NameDecision::Allowed),
            ("svc.local", 8000, NameDecision::CheckAddresses),
            ("evilsvc.local", 8000, NameDecision::CheckAddresses),
        ];
        for (name, port, want) in cases {
            assert_eq!(&a.check_name(name, *port), want, "{name}:{port}");
        }
        assert!(a.ip_allowed("10.1.200.3".parse().unwrap(), 1));
        assert!(!a.ip_allowed("10.2.0.1".parse().unwrap(), 1));
        assert!(a.ip_allowed("192.168.1.5".parse().unwrap(), 22));
        assert!(!a.ip_allowed("192.168.1.5".parse().unwrap(), 23));
        assert!(a.ip_allowed("::ffff:192.168.1.5".parse().unwrap(), 22));
        // 0.0.0.0 and :: connect to the relay's own host: refused even by rules that contain them.
        let wide = list(r#"[{"host":"0.0.0.0/8","port":"*"},{"host":"::/0","port":"*"},{"host":"*","port":1}]"#);
        for ip in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
            assert!(!wide.ip_allowed(ip.parse().unwrap(), 1), "{ip}");
        }
        assert!(wide.ip_allowed("0.1.2.3".parse().unwrap(), 1));
        let only_names = list(r#"[{"host":"db.internal","port":5432}]"#);
        assert_eq!(only_names.check_name("other", 5432), NameDecision::Denied);
    }

    #[test]
    fn other_spellings_of_an_ip_normalise() {
        for s in ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1"] {
            assert_eq!(TargetHost::parse(s).unwrap(), TargetHost::Ip("127.0.0.1".parse().unwrap()), "{s}");
        }
        assert_eq!(TargetHost::parse("DB.Internal.").unwrap(), TargetHost::Name("db.internal".into()));
        assert_eq!(TargetHost::parse("bücher.example").unwrap(), TargetHost::Name("xn--bcher-kva.example".into()));
        assert!(TargetHost::parse("").is_err());
        // Found by the socks5 fuzz target: these normalised to an empty name, or to a name that
        // is an IP literal or ends in a number.
        for dots in [".", "..", "...", "。。", "127.0.0.1...", "a..b", "..2...", ".localhost"] {
            assert!(TargetHost::parse(dots).is_err(), "{dots:?}");
        }
        assert_eq!(TargetHost::parse("127.0.0.1..").unwrap(), TargetHost::Ip("127.0.0.1".parse().unwrap()));
        // IDNA lengthens names: 80 Cyrillic letters fit the raw limit but not DNS's, after punycode.
        let long = format!("{}.example", "р".repeat(80));
        assert!(long.len() <= 253 && TargetHost::parse(&long).is_err(), "{long}");
        assert_eq!(TargetHost::parse("localhost。").unwrap(), TargetHost::Name("localhost".into()));
        assert!(TargetHost::parse("a b").is_err());
    }

    #[test]
    fn embedded_ipv4_spellings_are_judged_as_their_ipv4() {
        let lo = "127.0.0.1".parse::<Ipv4Addr>().unwrap();
        for s in [
            "::ffff:127.0.0.1",
            "::ffff:0:7f00:1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::7f00:1",
            "2002:7f00:1::1",
            "2001:0:1:2:3:4:80ff:fffe",
        ] {
            let v6: Ipv6Addr = s.parse().unwrap();
            assert_eq!(embedded_ipv4(v6).map(|(v4, _)| v4), Some(lo), "{s}");
            assert!(!name_rule_reaches(IpAddr::V6(v6), false, &[]), "a wildcard reaches {s}");
        }
        for s in ["::", "::1", "2001:db8::1", "fd00:ec2::254"] {
            assert_eq!(embedded_ipv4(s.parse().unwrap()), None, "{s}");
        }
        let a = list(r#"[{"host":"::/0","port":"*"},{"host":"10.0.0.0/8","port":"*"},{"host":"2002:c000:0201::/48","port":"*"}]"#);
        assert!(!a.ip_allowed("64:ff9b::7f00:1".parse().unwrap(), 1), "::/0 does not name NAT64 loopback");
        assert!(a.ip_allowed("64:ff9b::a01:203".parse().unwrap(), 1), "carries 10.1.2.3");
        assert!(a.ip_allowed("2002:c000:201::1".parse().unwrap(), 1), "a rule inside the 6to4 prefix names it");
        assert!(a.ip_allowed("2001:db8::1".parse().unwrap(), 1));
    }

    #[test]
    fn name_rules_never_reach_the_host_or_metadata() {
        let host: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (addr, exact, want) in [
            ("192.0.2.10", true, false),
            ("::ffff:192.0.2.10", false, false),
            ("64:ff9b::c000:20a", false, false),
            ("2001:db8::10", true, false),
            ("169.254.169.254", true, false),
            ("fd00:ec2::254", true, false),
            ("100.100.100.200", true, false),
            ("192.0.0.192", true, false),
            ("0.0.0.0", true, false),
            ("255.255.255.255", true, false),
            ("224.0.0.1", true, false),
            ("127.0.0.1", false, false),
            ("127.0.0.1", true, true),
            ("169.254.1.1", false, false),
            ("fe80::1", true, true),
            ("192.0.2.11", false, true),
            ("100.100.100.201", false, true),
        ] {
            assert_eq!(name_rule_reaches(ip(addr), exact, &host), want, "{addr} exact={exact}");
        }
    }

    #[test]
    fn broad_rules_reach_special_addresses_only_when_named_exactly() {
        let host: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let broad = list(r#"[{"host":"0.0.0.0/0","port":"*"},{"host":"::/0","port":"*"},{"host":"*","port":1}]"#);
        for port in [1, 2] {
            for addr in [
                "169.254.169.254",
                "169.254.1.1",
                "169.254.170.2",
                "fd00:ec2::254",
                "100.100.100.200",
                "192.0.0.192",
                "127.0.0.1",
                "127.9.9.9",
                "::1",
                "fe80::1",
                "192.0.2.10",
                "::ffff:192.0.2.10",
                "2001:db8::10",
                "64:ff9b::a9fe:a9fe",
            ] {
                assert!(!broad.ip_allowed_on(ip(addr), port, &host), "{addr}:{port} through a broad rule");
            }
            assert!(broad.ip_allowed_on(ip("192.0.2.11"), port, &host), "an ordinary address");
            assert!(broad.ip_allowed_on(ip("2001:db8::11"), port, &host));
        }
        // A CIDR containing the host, or the whole link-local range, is broad too.
        let ranges = list(r#"[{"host":"192.0.2.0/24","port":"*"},{"host":"169.254.0.0/16","port":"*"},{"host":"127.0.0.0/8","port":"*"}]"#);
        for addr in ["192.0.2.10", "169.254.169.254", "127.0.0.1"] {
            assert!(!ranges.ip_allowed_on(ip(addr), 1, &host), "{addr}");
        }
        assert!(ranges.ip_allowed_on(ip("192.0.2.11"), 1, &host));
        // Exact rules reach them.
        let exact = list(
            r#"[{"host":"169.254.169.254","port":80},{"host":"127.0.0.1/32","port":"*"},{"host":"fd00:ec2::254/128","port":80},{"host":"192.0.2.10","port":"*"},{"host":"64:ff9b::a9fe:a9fe/128","port":80}]"#,
        );
        for addr in ["169.254.169.254", "127.0.0.1", "fd00:ec2::254", "192.0.2.10", "64:ff9b::a9fe:a9fe"] {
            assert!(exact.ip_allowed_on(ip(addr), 80, &host), "{addr} through its exact rule");
        }
        assert!(!exact.ip_allowed_on(ip("169.254.169.254"), 81, &host), "the port still applies");
        // Start-up notes: one per broad rule, none for exact or ordinary ones.
        assert_eq!(broad.broad_rule_notes(&host).len(), 3);
        assert_eq!(ranges.broad_rule_notes(&host).len(), 3);
        assert!(exact.broad_rule_notes(&host).is_empty());
        assert!(list(r#"[{"host":"10.0.0.0/8","port":"*"},{"host":"db.internal","port":1}]"#).broad_rule_notes(&host).is_empty());
        let note = &broad.broad_rule_notes(&host)[0];
        assert!(
            note.contains("0.0.0.0/0") && note.contains("169.254.0.0/16") && note.contains("127.0.0.0/8") && note.contains("own addresses"),
            "{note}"
        );
    }

    #[test]
    fn bad_rules_name_the_problem() {
        for (json, needle) in [
            (r#"[{"host":"x","port":0}]"#, "1-65535"),
            (r#"[{"host":"x","port":"9-3"}]"#, "range"),
            (r#"[{"host":"10.0.0.0/99","port":1}]"#, "CIDR"),
            (r#"[{"host":"*.","port":1}]"#, "wildcard"),
            (r#"[{"host":"x","port":1,"extra":1}]"#, "JSON list"),
            (r#"{"host":"x"}"#, "JSON list"),
        ] {
            let e = Allowlist::from_json(json, "TUNNEL_ALLOW").unwrap_err();
            assert!(e.message().contains(needle), "{json}: {e}");
        }
    }
}
