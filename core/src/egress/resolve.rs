//! Name resolution for stream targets. By default the system resolver (`getaddrinfo`, so
//! `/etc/hosts` and the host's DNS config apply). With `dns_servers` set, the relay asks those
//! servers first, in order, one second each, and falls back to the system resolver when none
//! answers — Emissary's `EMISSARY_DNS_SERVERS` behaviour. Unlike Emissary, every address of the
//! answer is kept, so the allowlist can check each one and connect can try them in turn.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts, ServerOrderingStrategy};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::error::{Error, Result};

/// How the relay resolves target names.
#[derive(Clone)]
pub enum TargetResolver {
    /// The operating system's resolver.
    System,
    /// Configured DNS servers, then the system resolver.
    Servers(Box<TokioResolver>),
}

impl std::fmt::Debug for TargetResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetResolver::System => f.write_str("System"),
            TargetResolver::Servers(_) => f.write_str("Servers"),
        }
    }
}

impl TargetResolver {
    /// A resolver for these servers (the system resolver when the list is empty).
    pub fn new(servers: &[SocketAddr]) -> Result<TargetResolver> {
        if servers.is_empty() {
            return Ok(TargetResolver::System);
        }
        let name_servers = servers
            .iter()
            .map(|sa| {
                let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                for c in &mut ns.connections {
                    c.port = sa.port();
                }
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(1);
        opts.attempts = 1;
        opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
        let resolver = TokioResolver::builder_with_config(ResolverConfig::from_name_servers(name_servers), TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| Error::config(format!("cannot set up the DNS resolver for TUNNEL_DNS_SERVERS: {e}")))?;
        Ok(TargetResolver::Servers(Box::new(resolver)))
    }

    /// Every address `name` resolves to, with `port`.
    pub async fn lookup(&self, name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let TargetResolver::Servers(r) = self {
            match r.lookup_ip(name).await {
                Ok(found) => {
                    let addrs: Vec<SocketAddr> = found.iter().map(|ip: IpAddr| SocketAddr::new(ip, port)).collect();
                    if !addrs.is_empty() {
                        return Ok(addrs);
                    }
                }
                Err(e) => {
                    tracing::debug!(%name, error = %e, "configured DNS servers gave no answer; trying the system resolver")
                }
            }
        }
        Ok(tokio::net::lookup_host((name, port)).await?.collect())
    }
}

/// The relay host's own interface addresses (every address of every interface, from
/// `getifaddrs`), read again when older than 5 s, so an interface that appears (a VPN, a docker
/// bridge) is known soon after.
pub fn host_addresses() -> std::sync::Arc<Vec<IpAddr>> {
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Instant;
    type Cached = Option<(Instant, Arc<Vec<IpAddr>>)>;
    static CACHE: OnceLock<Mutex<Cached>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
    match &*cache {
        Some((at, addrs)) if at.elapsed() < Duration::from_secs(5) => addrs.clone(),
        _ => {
            let addrs = Arc::new(interface_addresses().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list the host's interface addresses");
                Vec::new()
            }));
            *cache = Some((Instant::now(), addrs.clone()));
            addrs
        }
    }
}

/// Check at start-up that the host's own addresses can be listed when `allow` has a rule that
/// could reach one (`listed`: the outcome of listing them). Without the list, a name that
/// resolves to the host, or a broad rule, would reach it: that is an error, not a warning.
pub fn check_host_addresses(allow: &crate::egress::Allowlist, listed: std::io::Result<Vec<IpAddr>>, what: &str) -> Result<()> {
    match listed {
        Err(e) if allow.needs_host_addresses() => Err(Error::config(format!(
            "cannot list this host's own addresses ({e}), which {what} must keep out of reach of its allow rules; \
             under systemd, allow AF_NETLINK in RestrictAddressFamilies= (getifaddrs needs it), or keep only rules naming single IP addresses"
        ))),
        _ => Ok(()),
    }
}

/// At start-up: refuse to run when the host's own addresses cannot be listed and a rule could
/// reach one, and log what each broad rule (`0.0.0.0/0`, `*`) leaves out. `who` names the
/// allowlist's owner (the relay, an exit listener).
pub(crate) fn note_allow_rules(allow: &crate::egress::Allowlist, who: &str) -> Result<()> {
    let listed = interface_addresses();
    let host = listed.as_ref().map(|v| v.clone()).unwrap_or_default();
    check_host_addresses(allow, listed, who)?;
    for note in allow.broad_rule_notes(&host) {
        tracing::info!(owner = who, "{note}");
    }
    Ok(())
}

/// The host's interface addresses, listed now (`getifaddrs`).
#[cfg(unix)]
pub fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut found = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we only read, then free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = head;
        while !p.is_null() {
            let sa = (*p).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        found.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(found)
}

/// The host's interface addresses: none known on this platform.
#[cfg(not(unix))]
pub fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    /// A one-name DNS server on loopback UDP: answers A queries for `name` with `ip`, and every
    /// other query with an empty NOERROR answer.
    async fn fake_dns(name: &'static str, ip: [u8; 4]) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let q = &buf[..n];
                let mut i = 12;
                let mut labels = Vec::new();
                while i < n && q[i] != 0 {
                    let len = q[i] as usize;
                    labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + len]).to_ascii_lowercase());
                    i += 1 + len;
                }
                let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
                let question_end = i + 5;
                let answer = labels.join(".") == name && qtype == 1;
                let mut r = q[..question_end].to_vec();
                r[2] = 0x80 | (q[2] & 0x01); // response, copy RD
                r[3] = 0x80; // RA, NOERROR
                r[6..8].copy_from_slice(&(answer as u16).to_be_bytes()); // ANCOUNT
                r[8..12].fill(0); // NSCOUNT, ARCOUNT
                if answer {
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                    r.extend_from_slice(&ip);
                }
                let _ = sock.send_to(&r, from).await;
            }
        });
        addr
    }

    #[test]
    fn the_host_addresses_include_loopback() {
        let addrs = host_addresses();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }

    #[test]
    fn unlisted_host_addresses_are_an_error_only_when_a_rule_could_reach_them() {
        let denied = || Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        let exact = crate::egress::Allowlist::from_json(r#"[{"host":"10.0.0.5","port":5432}]"#, "t").unwrap();
        assert!(check_host_addresses(&exact, denied(), "the relay").is_ok(), "single addresses need no list");
        for rules in [r#"[{"host":"db.internal","port":5432}]"#, r#"[{"host":"10.0.0.0/8","port":"*"}]"#, r#"[{"host":"*","port":1}]"#] {
            let a = crate::egress::Allowlist::from_json(rules, "t").unwrap();
            let e = check_host_addresses(&a, denied(), "the relay").unwrap_err();
            assert!(e.message().contains("AF_NETLINK") && e.message().contains("cannot list"), "{rules}: {e}");
            assert!(check_host_addresses(&a, Ok(vec![]), "the relay").is_ok());
        }
    }

    #[tokio::test]
    async fn configured_servers_answer_names_the_system_does_not_know() {
        let dns = fake_dns("db.libtunnel-private", [127, 0, 0, 9]).await;
        let r = TargetResolver::new(&[dns]).unwrap();
        let got = r.lookup("db.libtunnel-private", 5432).await.unwrap();
        assert_eq!(got, vec![SocketAddr::from(([127, 0, 0, 9], 5432))]);
    }

    #[tokio::test]
    async fn silent_servers_fall_back_to_the_system_resolver() {
        // A name only the system resolver knows: one from /etc/hosts other than localhost
        // (which the DNS library answers by itself). Every Linux test machine has the hostname there.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let name = hosts
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split_whitespace().skip(1))
            .find(|n| !n.starts_with("localhost") && !n.contains("ip6"))
            .expect("/etc/hosts names this machine")
            .to_string();
        // A bound UDP socket that never answers: the 1 s timeout passes, then the system resolver.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = TargetResolver::new(&[silent.local_addr().unwrap()]).unwrap();
        let t0 = std::time::Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(10), r.lookup(&name, 80)).await.unwrap().unwrap();
        assert!(!got.is_empty(), "{name} resolved to nothing");
        assert!(t0.elapsed() >= Duration::from_millis(900), "the configured server was not asked first");
    }
}
