//! A real nginx (Debian's `nginx-light`) in front of a relay as a gRPC-only reverse proxy:
//! HTTP/2 on a plain port (prior knowledge) and optionally on a TLS port (ALPN h2, a self-signed
//! certificate for `localhost`), `grpc_pass` of the session method to the relay's tunnel port, and
//! nothing else: no WebSocket upgrade is configured, so only gRPC gets through. Everything
//! nginx writes (pid, logs, temp files) stays in its own temp dir, so it runs unprivileged or as
//! root without touching /etc or /var; one process (`master_process off`), killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::cluster::{free_port, program};

/// Whether nginx is installed; when not, the test is skipped with a line in the skip log
/// (`scripts/test.sh` installs `nginx-light`). Under `CI` a missing nginx fails the test.
pub fn nginx_program() -> bool {
    if program("nginx").is_some() {
        return true;
    }
    let why = "nginx tests skipped: nginx not installed (apt-get install nginx-light; scripts/test.sh does)";
    crate::skip(why);
    false
}

/// The `location` block a user puts in an nginx `server` (one with HTTP/2 on) to pass libtunnel's
/// gRPC sessions to a relay; `RELAY` stands for the `host:port` of its tunnel endpoint (plain
/// HTTP/2). The same block is in `docs/guide/grpc-nginx.md`.
pub const LOCATION: &str = r#"location /libtunnel.v1.Tunnel/ {
    grpc_pass grpc://RELAY;
    # A session is one call that carries all the client sends, as long as the tunnel lives.
    # No body size limit: the default (1m) resets a session once it has sent 1 MiB.
    client_max_body_size 0;
    # nginx resets a call silent this long (default 60s); the tunnel pings after 10 s of silence.
    client_body_timeout 1h;
    grpc_read_timeout 1h;
    # ... or whose reader took nothing this long.
    grpc_send_timeout 1h;
    send_timeout 1h;
    grpc_socket_keepalive on;
    # Throughput: with the default buffers (16k, 4k) a session moves a fraction of the bytes.
    client_body_buffer_size 1m;
    grpc_buffer_size 1m;
}
"#;

/// nginx (1.22 and older spell HTTP/2 as a `listen` parameter; 1.25.1 and newer as `http2 on;`).
pub struct Nginx {
    pub child: Child,
    /// The plain HTTP/2 port: `grpc://127.0.0.1:PORT`.
    pub plain: SocketAddr,
    /// The TLS port when started with TLS: `grpcs://localhost:PORT`.
    pub tls: Option<SocketAddr>,
    /// The PEM of the TLS port's self-signed certificate (for `ClientTls::from_pem`).
    pub cert_pem: Option<String>,
    pub dir: PathBuf,
}

impl Nginx {
    /// nginx passing gRPC on a plain HTTP/2 port to the relay's tunnel endpoint `relay`.
    pub async fn start(relay: SocketAddr) -> Nginx {
        Nginx::start_with(relay, false).await
    }

    /// With `tls`, also a TLS port (certificate for `localhost`, ALPN h2) passing to the same
    /// relay over plain HTTP/2: nginx terminates TLS.
    pub async fn start_with(relay: SocketAddr, tls: bool) -> Nginx {
        Nginx::start_with_location(relay, tls, LOCATION).await
    }

    /// With another `location` block than [`LOCATION`] (`RELAY` in it stands for the relay's
    /// address): to show what nginx does to a tunnel without some of its settings.
    pub async fn start_with_location(relay: SocketAddr, tls: bool, location: &str) -> Nginx {
        // The ports were free a moment ago; another process may have taken one since.
        let mut last = String::new();
        for _ in 0..5 {
            match Nginx::try_start(relay, tls, location).await {
                Ok(nginx) => return nginx,
                Err(log) => last = log,
            }
        }
        panic!("nginx found no free port in 5 attempts: {last}");
    }

    /// nginx on ports that were free; `Err(error log)` when one was taken meanwhile.
    async fn try_start(relay: SocketAddr, tls: bool, location: &str) -> Result<Nginx, String> {
        let bin = program("nginx").expect("nginx (check nginx_program() first)");
        let plain = SocketAddr::from(([127, 0, 0, 1], free_port().await));
        let tls_addr = if tls { Some(SocketAddr::from(([127, 0, 0, 1], free_port().await))) } else { None };
        let dir = std::env::temp_dir().join(format!("libtunnel-nginx-{}-{}", std::process::id(), plain.port()));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let new_syntax = version(&bin).is_some_and(|v| v >= (1, 25, 1));
        let (h2_param, h2_directive) = if new_syntax { ("", "        http2 on;\n") } else { (" http2", "") };
        let mut listens = format!("        listen {plain}{h2_param};\n");
        let mut cert_pem = None;
        if let Some(addr) = tls_addr {
            let (_, _, pem) = crate::self_signed_cert_in(&dir);
            listens.push_str(&format!(
                "        listen {addr} ssl{h2_param};\n        ssl_certificate {d}/cert.pem;\n        ssl_certificate_key {d}/key.pem;\n",
                d = dir.display()
            ));
            cert_pem = Some(pem);
        }
        let d = dir.display();
        let cfg = format!(
            "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{\n    worker_connections 1024;\n}}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   server {{\n\
             {listens}{h2_directive}\
             {location}\
             \x20   }}\n\
             }}\n",
            location = location.replace("RELAY", &relay.to_string()).lines().map(|l| format!("        {l}\n")).collect::<String>(),
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, cfg).expect("write nginx.conf");
        let child = Command::new(&bin)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { child, plain, tls: tls_addr, cert_pem, dir };
        // Until it listens on every port (or exits, with its error log as the failure).
        let deadline = tokio::time::Instant::now() + crate::STEP;
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = nginx.error_log();
                if log.contains("Address already in use") {
                    return Err(log);
                }
                panic!("nginx exited ({status}): {log}");
            }
            let mut up = true;
            for p in std::iter::once(plain).chain(tls_addr) {
                up &= TcpStream::connect(p).await.is_ok();
            }
            if up {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "nginx did not listen within {:?}: {}", crate::STEP, nginx.error_log());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(nginx)
    }

    /// `grpc://127.0.0.1:PORT`.
    pub fn grpc_url(&self) -> String {
        format!("grpc://{}", self.plain)
    }

    /// `grpcs://localhost:PORT` (the certificate's name).
    pub fn grpcs_url(&self) -> String {
        format!("grpcs://localhost:{}", self.tls.expect("nginx started with TLS").port())
    }

    /// nginx's error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nginx's version from `nginx -v` (it prints `nginx version: nginx/1.22.1` on stderr).
fn version(bin: &Path) -> Option<(u32, u32, u32)> {
    let out = std::process::Command::new(bin).arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
}
