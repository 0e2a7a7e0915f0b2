//! A relay cluster on loopback for tests: a real `redis-server` (Debian's), `tunnel server`
//! processes as its nodes, and a real HAProxy in front of them as a plain TCP load balancer
//! (tunnel port and public HTTP port), with health checks so a dead node leaves the rotation.
//! Everything is a child process killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// The cluster key every node of these tests shares (`KID:BASE64`).
pub const CLUSTER_KEY: &str = "9:Y2x1c3Rlci10ZXN0LWtleS0wMTIzNDU2Nzg5YWJjZGVm";

/// The path of a program from `PATH` or the sbin directories (HAProxy lives in /usr/sbin).
pub fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/local/sbin"]).map(|d| Path::new(d).join(name)).find(|p| p.is_file());
    found
}

/// Whether redis-server and haproxy are installed; when not, the test is skipped with a line in
/// the skip log (the README's test command installs both; a bare `cargo test` may lack them).
pub fn cluster_programs() -> bool {
    let missing: Vec<&str> = ["redis-server", "haproxy"].into_iter().filter(|p| program(p).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("cluster tests skipped: {} not installed (apt-get install redis-server haproxy; scripts/test.sh does)", missing.join(" and "));
    crate::skip(&why);
    false
}

/// A loopback port that was free a moment ago.
pub async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// A `redis-server` on 127.0.0.1 with no persistence.
pub struct Redis {
    pub child: Child,
    pub port: u16,
}

impl Redis {
    pub async fn start(port: u16) -> Redis {
        let child = Command::new(program("redis-server").expect("redis-server"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        crate::eventually("redis-server to answer PING", || async {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
            let mut buf = [0u8; 7];
            s.write_all(b"PING\r\n").await?;
            s.read_exact(&mut buf).await?;
            crate::holds(buf, |b| b == b"+PONG\r\n").map_err(|b| std::io::Error::other(String::from_utf8_lossy(&b).into_owned()))
        })
        .await;
        Redis { child, port }
    }

    /// A `redis-server` serving TLS only, on `port`, with `cert`/`key` (clients not asked for
    /// certificates).
    pub async fn start_tls(port: u16, cert: &Path, key: &Path, ca: &Path) -> Redis {
        let p = |p: &Path| p.to_str().expect("utf8").to_string();
        let child = Command::new(program("redis-server").expect("redis-server"))
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &p(cert), "--tls-key-file", &p(key), "--tls-ca-cert-file", &p(ca), "--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server with TLS");
        crate::eventually("redis-server (TLS) to listen", || TcpStream::connect(("127.0.0.1", port))).await;
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many keys match `pattern` (an inline `KEYS` command; the reply's array length).
    pub async fn count_keys(&self, pattern: &str) -> usize {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect to redis");
        s.write_all(format!("KEYS {pattern}\r\n").as_bytes()).await.expect("send");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n") {
            s.read_exact(&mut b).await.expect("reply");
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head);
        text.trim().strip_prefix('*').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("unexpected KEYS reply {text:?}"))
    }

    /// Run one command as another client of the same Redis would (anyone with write access):
    /// the reply as text lines (a status, an integer, a bulk string, or each element of an array
    /// of them).
    pub async fn cmd(&self, args: &[&str]) -> Vec<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect to redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.expect("send");
        let mut r = BufReader::new(s);
        async fn line(r: &mut BufReader<TcpStream>) -> String {
            let mut l = String::new();
            r.read_line(&mut l).await.expect("reply line");
            l.trim_end().to_string()
        }
        async fn bulk(r: &mut BufReader<TcpStream>, head: &str) -> String {
            let n: i64 = head[1..].parse().expect("bulk length");
            if n < 0 {
                return String::new();
            }
            let mut b = vec![0u8; n as usize + 2];
            r.read_exact(&mut b).await.expect("bulk");
            String::from_utf8_lossy(&b[..n as usize]).into_owned()
        }
        let head = line(&mut r).await;
        match head.as_bytes().first() {
            Some(b'+' | b':') => vec![head[1..].to_string()],
            Some(b'$') => vec![bulk(&mut r, &head).await],
            Some(b'*') => {
                let n: usize = head[1..].parse().unwrap_or(0);
                let mut out = Vec::new();
                for _ in 0..n {
                    let h = line(&mut r).await;
                    out.push(if h.starts_with('$') { bulk(&mut r, &h).await } else { h[1..].to_string() });
                }
                out
            }
            _ => panic!("redis answered {args:?} with {head:?}"),
        }
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// One `tunnel server` process, a node of the cluster.
pub struct Node {
    pub child: Child,
    /// `ws://127.0.0.1:PORT` (`wss://` with a certificate).
    pub url: String,
    pub ws: SocketAddr,
    pub http: SocketAddr,
    /// The QUIC endpoint, when `quic_listen` is set (it prints its line before the others).
    pub quic: Option<SocketAddr>,
}

impl Node {
    /// Start a node with the cluster settings for `redis` and any `extra` settings
    /// (`name=value`), on ports chosen by the OS; waits for its ready lines.
    pub async fn start(redis_url: &str, extra: &[String]) -> Node {
        let mut cmd = Command::new(crate::procs::tunnel_bin());
        cmd.arg("server");
        let mut set = vec![
            "listen=127.0.0.1:0".to_string(),
            "http_listen=127.0.0.1:0".to_string(),
            format!("auth_keys={}", super::auth_keys_json()),
            "allow=[{\"host\": \"127.0.0.1\", \"port\": 1}]".to_string(),
            "listeners_open=true".to_string(),
            format!("cluster_redis={redis_url}"),
            format!("cluster_key={CLUSTER_KEY}"),
        ];
        set.extend(extra.iter().cloned());
        let wants_quic = set.iter().any(|s| s.starts_with("quic_listen="));
        for s in &set {
            cmd.args(["--set", s]);
        }
        let log = std::env::var_os("RUST_LOG").is_some();
        let mut child = cmd
            .env_remove("TUNNEL_LISTEN")
            .stdout(Stdio::piped())
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .kill_on_drop(true)
            .spawn()
            .expect("start tunnel server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut url, mut http, mut quic) = (None, None, None);
            let mut tx = Some(tx);
            let mut line = String::new();
            while out.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                if let Some(u) = line.trim().strip_prefix("relay listening: ") {
                    url = Some(u.to_string());
                }
                if let Some(h) = line.trim().strip_prefix("public http listening: http://") {
                    http = h.parse::<SocketAddr>().ok();
                }
                if let Some(q) = line.trim().strip_prefix("quic listening: quic://") {
                    quic = q.parse::<SocketAddr>().ok();
                }
                // `quic listening` is the last ready line when there is one.
                let done = quic.is_some() || !wants_quic;
                if let (Some(u), Some(h), true) = (&url, http, done) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((u.clone(), h, quic));
                    }
                }
                line.clear();
            }
        });
        let (url, http, quic) = tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .expect("tunnel server printed its ready lines within 15 s")
            .expect("tunnel server exited before it was ready");
        let ws = url.trim_start_matches("wss://").trim_start_matches("ws://").parse().expect("ws address");
        Node { child, url, ws, http, quic }
    }

    /// SIGKILL: the process dies at once, sockets are reset by the kernel.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    /// A series of the node's `/metrics` (served on the tunnel port).
    pub async fn metric(&self, series: &str) -> i64 {
        let (status, body) = super::http_get(self.ws, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        super::metric(&body, series)
    }
}

/// HAProxy in TCP mode in front of the nodes' tunnel ports and public HTTP ports.
pub struct Balancer {
    pub child: Child,
    /// `ws://127.0.0.1:PORT`, the one relay URL clients use.
    pub url: String,
    pub http: SocketAddr,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Balancer {
    pub async fn start(nodes: &[&Node]) -> Balancer {
        Balancer::start_with(nodes, false).await
    }

    /// With `proxy`, HAProxy connects to the nodes from 127.0.0.9 and sends a PROXY v2 header
    /// naming each client (nodes trust it with `proxy_protocol_from=127.0.0.9`).
    pub async fn start_with(nodes: &[&Node], proxy: bool) -> Balancer {
        let (tunnel_port, http_port) = (free_port().await, free_port().await);
        let dir = std::env::temp_dir().join(format!("libtunnel-haproxy-{}-{tunnel_port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let servers = |pick: &dyn Fn(&Node) -> SocketAddr| {
            let extra = if proxy { " send-proxy-v2 source 127.0.0.9" } else { "" };
            nodes.iter().enumerate().map(|(i, n)| format!("    server n{i} {} check inter 200 fall 1 rise 1{extra}\n", pick(n))).collect::<String>()
        };
        let cfg = format!(
            "global\n    maxconn 4000\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n    retries 3\n    option redispatch\n\
             frontend tunnel\n    bind 127.0.0.1:{tunnel_port}\n    default_backend nodes_tunnel\n\
             backend nodes_tunnel\n    balance roundrobin\n{}\
             frontend public\n    bind 127.0.0.1:{http_port}\n    default_backend nodes_http\n\
             backend nodes_http\n    balance roundrobin\n{}",
            servers(&|n| n.ws),
            servers(&|n| n.http),
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let child = Command::new(program("haproxy").expect("haproxy"))
            .args(["-db", "-f", path.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start haproxy");
        crate::eventually("haproxy to listen on its HTTP and tunnel ports", || async {
            TcpStream::connect(("127.0.0.1", http_port)).await?;
            TcpStream::connect(("127.0.0.1", tunnel_port)).await
        })
        .await;
        Balancer { child, url: format!("ws://127.0.0.1:{tunnel_port}"), http: SocketAddr::from(([127, 0, 0, 1], http_port)), _dir: TempDir(dir) }
    }
}

/// Whether Debian's `redis-sentinel` is installed; when not, the test is skipped with a line in
/// the skip log (`scripts/test.sh` installs it).
pub fn sentinel_program() -> bool {
    if program("redis-sentinel").is_some() {
        return true;
    }
    let why = "sentinel failover test skipped: redis-sentinel not installed (apt-get install redis-sentinel; scripts/test.sh does)";
    crate::skip(&why);
    false
}

impl Redis {
    /// A `redis-server` replicating `primary` (port), on `port`; the copy it receives is written
    /// in `dir`.
    pub async fn start_replica(port: u16, primary: u16, dir: &Path) -> Redis {
        let child = Command::new(program("redis-server").expect("redis-server"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--replicaof", "127.0.0.1", &primary.to_string(), "--dir", dir.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server as a replica");
        let r = Redis { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !r.cmd_ok(&["INFO", "replication"]).await.is_some_and(|i| i.concat().contains("master_link_status:up")) {
            assert!(tokio::time::Instant::now() < deadline, "the replica did not sync with its primary within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }

    /// A `redis-sentinel` on `port` monitoring the primary on `primary` as `master` (quorum 2,
    /// down after 1 s, a failed election retried after 4 s), its config file in `dir`.
    pub async fn start_sentinel(port: u16, primary: u16, master: &str, dir: &Path) -> Redis {
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {}\n\
                 sentinel monitor {master} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 2000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir.display()
            ),
        )
        .expect("write the sentinel's config");
        let child = Command::new(program("redis-sentinel").expect("redis-sentinel"))
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-sentinel");
        let r = Redis { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r.cmd_ok(&["PING"]).await.is_none() {
            assert!(tokio::time::Instant::now() < deadline, "redis-sentinel did not answer within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r
    }

    /// [`Redis::cmd`], or `None` when the server cannot be reached (yet, or any more).
    pub async fn cmd_ok(&self, args: &[&str]) -> Option<Vec<String>> {
        TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        Some(self.cmd(args).await)
    }
}
