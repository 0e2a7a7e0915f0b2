//! The `tunnel` command: relay server, port forward, local SOCKS5 proxy, stdin/stdout dial,
//! key generation and the embedded demo. Thin: all behaviour lives in the `libtunnel` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use libtunnel::config::{RelayConfig, SETTINGS};
use libtunnel::socks::Target;
use libtunnel::transport::ClientTls;
use libtunnel::{Dialer, Error, ErrorCode, Key, Mode, Server};
use tokio::io::AsyncWriteExt;

/// Print a status line on stdout. A closed stdout (`tunnel listen | head -1`, a supervisor that
/// stopped reading) must not stop the tunnel, so a failed write is ignored, where `println!`
/// would panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(name = "tunnel", version, about = "Reach private TCP services through a relay over one authenticated WebSocket")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (config: flags > TUNNEL_*/EMISSARY_* env > ./.env > --config TOML).
    Server(ServerArgs),
    /// Forward a local port to a target through the relay (like `ssh -L`).
    Forward {
        /// Local address or port to listen on (`5432`, `127.0.0.1:0`).
        local: String,
        /// Target as the relay sees it (`db.internal:5432`), or as the exit sees it with --via.
        target: String,
        /// Reach the target through this exit listener (`tunnel listen --exit`), inside its network.
        #[arg(long, value_name = "NAME")]
        via: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A local SOCKS5 proxy that tunnels every CONNECT (for curl --socks5-hostname, browsers).
    Socks {
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1:1080")]
        listen: String,
        /// Tunnel every CONNECT through this exit listener (`tunnel listen --exit`).
        #[arg(long, value_name = "NAME")]
        via: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Connect stdin/stdout to a target (usable as ssh ProxyCommand).
    Dial {
        /// Target (`host:port`).
        target: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Expose a local service through the relay under a name (a reverse tunnel, like ngrok).
    Listen {
        /// Local service address (`127.0.0.1:3000`); optional for an --exit listener.
        #[arg(long, required_unless_present = "exit")]
        to: Option<String>,
        /// Join the name's pool of replicas (every replica passes --pool); the relay spreads
        /// streams over them and a SIGTERM'd replica drains without losing a request.
        #[arg(long)]
        pool: bool,
        /// Be an exit listener: dialers the relay permits (TUNNEL_EXITS) reach the --allow targets
        /// in this network with `--via NAME`.
        #[arg(long, requires = "allow")]
        exit: bool,
        /// The exit's allow rules, JSON as TUNNEL_ALLOW (`[{"host":"db.internal","port":5432}]`).
        #[arg(long, requires = "exit", value_name = "JSON")]
        allow: Option<String>,
        /// Relay URL (ws://, wss:// or tcp://).
        #[arg(long, env = "TUNNEL_RELAY")]
        relay: String,
        /// Listener key file (Ed25519, PKCS#8 PEM; `tunnel keygen --listener --out FILE` makes one).
        #[arg(long, env = "TUNNEL_LISTENER_KEY")]
        key: PathBuf,
        /// Register this name instead of the key-derived one (the relay must grant it).
        #[arg(long)]
        name: Option<String>,
        /// Ask the relay for a public TCP port too.
        #[arg(long)]
        tcp_port: bool,
        /// Send a PROXY protocol v2 header with the original client address to the local service.
        #[arg(long)]
        proxy_protocol: bool,
        /// PEM file of CA certificates to trust for wss:// (default: public Web PKI).
        #[arg(long, env = "TUNNEL_CA")]
        ca: Option<PathBuf>,
    },
    /// Make a key: a shared secret for dialers (default), or an Ed25519 listener key (--listener).
    Keygen {
        /// Key id (shared-secret keys).
        #[arg(long, default_value_t = 1)]
        kid: u32,
        /// Make an Ed25519 listener key instead, written to --out with mode 0600.
        #[arg(long)]
        listener: bool,
        /// Where to write the listener key (must not exist).
        #[arg(long, requires = "listener")]
        out: Option<PathBuf>,
    },
    /// Run a relay, a demo service and dials through them on loopback, narrating each step.
    Demo,
}

#[derive(Args)]
struct ClientArgs {
    /// Relay URL (ws://, wss:// or tcp://).
    #[arg(long, env = "TUNNEL_RELAY")]
    relay: String,
    /// Shared key `KID:BASE64`, or a file containing it. Prefer the TUNNEL_KEY variable or a file
    /// over putting the secret itself on the command line.
    #[arg(long, env = "TUNNEL_KEY", hide_env_values = true)]
    key: String,
    /// Speak Emissary's classic protocol (one WebSocket per connection) instead of multiplexing.
    #[arg(long)]
    classic: bool,
    /// PEM file of CA certificates to trust for wss:// (default: public Web PKI).
    #[arg(long, env = "TUNNEL_CA")]
    ca: Option<PathBuf>,
    /// Seconds one dial may take.
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
}

impl ClientArgs {
    fn dialer(&self) -> Result<Dialer, Error> {
        let key_text = match std::fs::read_to_string(&self.key) {
            Ok(s) => s,
            Err(_) if self.key.contains(':') => self.key.clone(),
            Err(e) => {
                return Err(Error::new(ErrorCode::InvalidArgument, format!("--key {:?} is neither KID:BASE64 nor a readable file ({e})", self.key)))
            }
        };
        let mut b = Dialer::builder(&self.relay)
            .key(Key::parse(&key_text)?)
            .mode(if self.classic { Mode::Classic } else { Mode::Multiplexed })
            .timeout(Duration::from_secs_f64(self.timeout.max(0.001)));
        if let Some(ca) = &self.ca {
            b = b.tls(ClientTls::from_pem_file(ca)?);
        }
        b.build()
    }
}

#[derive(Args)]
struct ServerArgs {
    /// TOML config file (keys are the lower-case setting names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Set any relay setting, e.g. `--set listen=0.0.0.0:7835` (repeatable; see the list below).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Tunnel endpoint address (TUNNEL_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Raw-TCP endpoint address (TUNNEL_TCP_LISTEN).
    #[arg(long)]
    tcp_listen: Option<String>,
    /// JSON list of {kid, data} keys (TUNNEL_AUTH_KEYS).
    #[arg(long)]
    auth_keys: Option<String>,
    /// JSON list of {host, port} allow rules (TUNNEL_ALLOW).
    #[arg(long)]
    allow: Option<String>,
    /// PEM certificate chain for wss:// (TUNNEL_TLS_CERT).
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key for wss:// (TUNNEL_TLS_KEY).
    #[arg(long)]
    tls_key: Option<String>,
}

/// Ctrl-C or SIGTERM, one at a time (the handler is installed once, so no signal is missed).
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> StopSignals {
        StopSignals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler"),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves at the first Ctrl-C or SIGTERM; a second one exits at once, without waiting for the
/// drain.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let mut signals = StopSignals::install();
    async move {
        signals.next().await;
        tokio::spawn(async move {
            signals.next().await;
            eprintln!("second signal: exiting now, without waiting for open streams");
            std::process::exit(130);
        });
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Server(a) => {
            let mut overrides: Vec<(String, String)> = Vec::new();
            for s in &a.set {
                let (k, v) = s.split_once('=').ok_or_else(|| Error::new(ErrorCode::InvalidConfig, format!("--set {s:?} must be NAME=VALUE")))?;
                overrides.push((k.trim().to_ascii_lowercase(), v.to_string()));
            }
            for (name, v) in [
                ("listen", &a.listen),
                ("tcp_listen", &a.tcp_listen),
                ("auth_keys", &a.auth_keys),
                ("allow", &a.allow),
                ("tls_cert", &a.tls_cert),
                ("tls_key", &a.tls_key),
            ] {
                if let Some(v) = v {
                    overrides.push((name.into(), v.clone()));
                }
            }
            let cfg = RelayConfig::load(a.config.as_deref(), &overrides)?;
            let server = Server::bind(cfg).await?;
            // One machine-readable line, so scripts can find the port when listening on :0.
            say!("relay listening: {}", server.url());
            if let Some(t) = server.tcp_addr() {
                say!("raw tcp listening: tcp://{t}");
            }
            if let Some(h) = server.http_addr() {
                say!("public http listening: http://{h}");
            }
            #[cfg(unix)]
            {
                // SIGHUP reloads keys, allowlist and listener grants from the same sources.
                let (reloader, file) = (server.reloader(), a.config.clone());
                let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                    .map_err(|e| Error::new(ErrorCode::Io, format!("cannot install the SIGHUP handler: {e}")))?;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match RelayConfig::load(file.as_deref(), &overrides).and_then(|cfg| reloader.reload(&cfg)) {
                            Ok(()) => eprintln!("reloaded keys, allowlist and listener grants"),
                            Err(e) => eprintln!("reload failed, keeping the previous settings: error [{}]: {e}", e.code()),
                        }
                    }
                });
            }
            server.run(shutdown_signal()).await
        }
        Cmd::Forward { local, target, via, client } => {
            let target = Target::parse(&target)?;
            let target = match &via {
                Some(v) => target.through_exit(v)?,
                None => target,
            };
            let dialer = client.dialer()?;
            let listener = libtunnel::forward::bind_local(&local).await?;
            let addr = listener.local_addr().map_err(|e| Error::from_io(e, "local address"))?;
            say!("forwarding {addr} -> {target} via {}", dialer.relay());
            if dialer.mode() == Mode::Multiplexed {
                if let Err(e) = dialer.connect().await {
                    tracing::warn!("{e} (will retry on the first connection)");
                }
            }
            libtunnel::forward::forward(listener, dialer, target, shutdown_signal()).await
        }
        Cmd::Socks { listen, via, client } => {
            let dialer = client.dialer()?;
            let dialer = match via {
                Some(v) => dialer.with_via(&v)?,
                None => dialer,
            };
            let listener = libtunnel::forward::bind_local(&listen).await?;
            let addr = listener.local_addr().map_err(|e| Error::from_io(e, "local address"))?;
            say!("socks5 proxy on {addr} via {}", dialer.relay());
            libtunnel::forward::socks_proxy(listener, dialer, shutdown_signal()).await
        }
        Cmd::Dial { target, client } => {
            let stream = client.dialer()?.dial(&target).await?;
            // Classic mode has no half-close: closing our side would close the tunnel before the
            // reply arrives, so at the end of stdin it only flushes and keeps reading.
            let classic = stream.mode() == Mode::Classic;
            let (mut rd, mut wr) = tokio::io::split(stream);
            let up = async {
                let mut stdin = tokio::io::stdin();
                let _ = tokio::io::copy(&mut stdin, &mut wr).await;
                let _ = if classic { wr.flush().await } else { wr.shutdown().await };
            };
            let down = async {
                let mut stdout = tokio::io::stdout();
                let r = tokio::io::copy(&mut rd, &mut stdout).await;
                let _ = stdout.flush().await;
                r
            };
            tokio::pin!(down);
            // The session ends when the remote side finishes, whatever stdin does.
            tokio::select! {
                r = &mut down => r.map(|_| ()).map_err(|e| Error::from_io(e, "reading from the tunnel")),
                _ = up => down.await.map(|_| ()).map_err(|e| Error::from_io(e, "reading from the tunnel")),
            }
        }
        Cmd::Keygen { listener: true, out, .. } => {
            let out = out.ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "--listener needs --out FILE to write the private key to"))?;
            let id = libtunnel::Identity::generate();
            id.save(&out)?;
            say!("# Wrote the listener's private key to {} (mode 0600)", out.display());
            say!("name: {}", id.name());
            say!("public key: {}", id.public_key_base64());
            say!("# For the relay: allow this key (and optionally grant chosen names)");
            say!("TUNNEL_LISTENER_KEYS='[{{\"public_key\":\"{}\",\"names\":[]}}]'", id.public_key_base64());
            Ok(())
        }
        Cmd::Keygen { kid, .. } => {
            let secret: [u8; 32] = rand::random();
            let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
            say!("# For clients (tunnel forward/socks/dial, the bindings): keep it secret");
            say!("TUNNEL_KEY={kid}:{b64}");
            say!("# For the relay (add to the list to rotate keys)");
            say!("TUNNEL_AUTH_KEYS='[{{\"kid\":{kid},\"data\":\"{b64}\"}}]'");
            Ok(())
        }
        Cmd::Listen { to, pool, exit, allow, relay, key, name, tcp_port, proxy_protocol, ca } => {
            let mut b = libtunnel::Listener::builder(&relay, libtunnel::Identity::load(&key)?).tcp_port(tcp_port).pool(pool);
            if let (true, Some(rules)) = (exit, &allow) {
                b = b.exit(libtunnel::egress::Allowlist::from_json(rules, "--allow")?);
            }
            if let Some(n) = name {
                b = b.name(n);
            }
            if let Some(ca) = &ca {
                b = b.tls(ClientTls::from_pem_file(ca)?);
            }
            let listener = b.bind().await?;
            let reg = listener.registration();
            // Machine-readable lines, so scripts can find what was granted.
            say!("listening as: {}", reg.name);
            say!("dial: {}:0 (through any dialer of this relay)", reg.name);
            if let Some(u) = &reg.http_url {
                say!("http: {u}");
            }
            if let Some(t) = &reg.tcp_addr {
                say!("tcp: {t}");
            }
            if pool {
                say!("pool: joined");
            }
            if let Some(rules) = allow.filter(|_| exit) {
                say!("exit: {} (dial with --via {})", rules, reg.name);
            }
            match to {
                Some(to) => {
                    say!("forwarding to: {to}");
                    libtunnel::forward::expose(listener, to, proxy_protocol, shutdown_signal()).await
                }
                None => libtunnel::forward::exit_only(listener, shutdown_signal()).await,
            }
        }
        Cmd::Demo => libtunnel::demo::run().await,
    }
}

/// The runtime a command runs on. The relay (and the demo, which embeds one) gets a worker per
/// core; client commands move one session's bytes, where a second worker mostly adds cross-thread
/// wake-ups per frame, so they run on one thread. `TUNNEL_WORKER_THREADS` overrides both.
fn runtime(cmd: &Cmd) -> Result<tokio::runtime::Runtime, Error> {
    let workers = match std::env::var("TUNNEL_WORKER_THREADS") {
        Ok(v) => Some(v.trim().parse::<usize>().ok().filter(|n| (1..=1024).contains(n)).ok_or_else(|| {
            Error::new(ErrorCode::InvalidConfig, format!("TUNNEL_WORKER_THREADS must be a whole number of threads between 1 and 1024, got {v:?}"))
        })?),
        Err(_) => None,
    };
    let relay = matches!(cmd, Cmd::Server(_) | Cmd::Demo);
    let mut b = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        None if !relay => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().thread_name("libtunnel-rt").build().map_err(|e| Error::new(ErrorCode::Io, format!("cannot start the runtime: {e}")))
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo narrates on stdout; its relay's routine logs would only interleave with the story.
    let default_level = if matches!(cli.cmd, Cmd::Demo) { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Cmd::Server(a) = &mut cli.cmd {
        if a.set.iter().any(|s| s == "help") {
            for s in SETTINGS {
                say!("{:<20} TUNNEL_{:<20} {}", s.name, s.name.to_ascii_uppercase(), s.help);
            }
            return ExitCode::SUCCESS;
        }
    }
    let rt = match runtime(&cli.cmd) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error [{}]: {e}", e.code());
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(run(cli));
    // `tunnel dial` ends when the remote side finishes, even with stdin still open (ssh
    // ProxyCommand); tokio's stdin read then sits on a blocking thread, and dropping the runtime
    // would wait for it forever. Everything else has finished by now, so do not wait.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error [{}]: {e}", e.code());
            ExitCode::from(match e.code() {
                ErrorCode::InvalidConfig | ErrorCode::InvalidArgument => 2,
                _ => 1,
            })
        }
    }
}
