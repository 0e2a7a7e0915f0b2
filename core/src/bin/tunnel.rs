//! The `tunnel` command: relay server, port forward, local SOCKS5 proxy, stdin/stdout dial,
//! key generation and the embedded demo. Thin: all behaviour lives in the `libtunnel` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use libtunnel::client::keys::{ListenerKeyText, SharedKeyText};
use libtunnel::client::{ClientOptions, ClientRole};
use libtunnel::config::{RelayConfig, SETTINGS};
use libtunnel::runtime::Workers;
use libtunnel::socks::Target;
use libtunnel::{Dialer, Error, ErrorCode, Mode, Server};
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
        /// Relay URL (ws://, wss:// or tcp://; default $TUNNEL_RELAY).
        #[arg(long)]
        relay: Option<String>,
        /// Listener key: a PEM file (`tunnel keygen --listener --out FILE` makes one), default
        /// $TUNNEL_LISTENER_KEY.
        #[arg(long)]
        key: Option<String>,
        /// Register this name instead of the key-derived one (the relay must grant it).
        #[arg(long)]
        name: Option<String>,
        /// Ask the relay for a public TCP port too.
        #[arg(long)]
        tcp_port: bool,
        /// Send a PROXY protocol v2 header with the original client address to the local service.
        #[arg(long)]
        proxy_protocol: bool,
        /// The local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server): public
        /// HTTP/1.1 and HTTP/2 requests reach it as HTTP/2.
        #[arg(long, conflicts_with = "tls_passthrough")]
        h2c: bool,
        /// The local service terminates TLS itself: the relay's HTTPS port passes connections
        /// whose SNI names this listener through undecrypted.
        #[arg(long)]
        tls_passthrough: bool,
        /// PEM file of CA certificates to trust for wss:// (default $TUNNEL_CA, else the public Web PKI).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Seconds the registration may take (default $TUNNEL_TIMEOUT, else 20).
        #[arg(long)]
        timeout: Option<f64>,
        /// End-to-end encryption: terminate TLS 1.3 (with this key, which the name proves) on every
        /// stream and refuse plaintext ones, so the relay sees only ciphertext.
        #[arg(long)]
        e2e: bool,
        /// With --e2e, require dialers' own keys and admit this one (base64 public key or
        /// key-derived name). Repeatable.
        #[arg(long = "allow-peer", value_name = "KEY", requires = "e2e")]
        allow_peer: Vec<String>,
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
    /// Show a running relay's listeners and sessions (from its admin endpoint, `admin_listen`).
    Status {
        /// The relay's admin endpoint, e.g. http://127.0.0.1:7836.
        #[arg(long)]
        admin: String,
        /// The relay's admin token (default $TUNNEL_ADMIN_TOKEN).
        #[arg(long)]
        token: Option<String>,
    },
    /// Print a shell completion script (`tunnel completions bash > /etc/bash_completion.d/tunnel`).
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from these same flags: `tunnel man > tunnel.1`.
    Man,
}

/// How a client command reaches the relay. Every value falls back to its `TUNNEL_*` variable
/// (from the environment or `./.env`), as in every other face: `libtunnel::client::config`.
#[derive(Args)]
struct ClientArgs {
    /// Relay URL (ws://, wss:// or tcp://; default $TUNNEL_RELAY).
    #[arg(long)]
    relay: Option<String>,
    /// Shared key `KID:BASE64`, or a file containing it (default $TUNNEL_KEY). Prefer the
    /// variable or a file over putting the secret itself on the command line.
    #[arg(long)]
    key: Option<String>,
    /// Speak Emissary's classic protocol (one WebSocket per connection) instead of
    /// multiplexing (default $TUNNEL_MODE, else multiplexed).
    #[arg(long)]
    classic: bool,
    /// PEM file of CA certificates to trust for wss:// (default $TUNNEL_CA, else the public Web PKI).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Seconds one dial may take (default $TUNNEL_TIMEOUT, else 20).
    #[arg(long)]
    timeout: Option<f64>,
    /// End-to-end encrypt dials to listener names (TLS 1.3 inside the tunnel; the listener's key
    /// must prove the name dialed, so the relay can neither read nor impersonate).
    #[arg(long)]
    e2e: bool,
    /// With --e2e, the key a chosen (relay-granted) name must have: NAME=KEY (base64 public key
    /// or key-derived name). Repeatable.
    #[arg(long = "e2e-pin", value_name = "NAME=KEY", requires = "e2e")]
    e2e_pin: Vec<String>,
    /// With --e2e, present this Ed25519 key file (`tunnel keygen --listener` makes one) to
    /// listeners that admit listed dialer keys (`--allow-peer`).
    #[arg(long = "e2e-identity", value_name = "FILE", requires = "e2e")]
    e2e_identity: Option<PathBuf>,
}

impl ClientArgs {
    fn options(&self) -> ClientOptions {
        ClientOptions {
            relay: self.relay.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            timeout: self.timeout,
            mode: self.classic.then_some(Mode::Classic),
            ..ClientOptions::default()
        }
    }

    fn dialer(&self) -> Result<Dialer, Error> {
        let config = self.options().resolve(ClientRole::Dialer)?;
        if !self.e2e {
            return config.dialer();
        }
        let mut e2e = libtunnel::e2e::DialerE2e::new();
        for pin in &self.e2e_pin {
            e2e = e2e.pin_spec(pin)?;
        }
        if let Some(path) = &self.e2e_identity {
            e2e = e2e.identity(libtunnel::Identity::load(path)?);
        }
        config.dialer_builder()?.e2e(e2e).build()
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
            // Machine-readable lines, so scripts can find the ports when listening on :0.
            say!("{}", server.ready_lines().trim_end());
            #[cfg(unix)]
            {
                // SIGHUP reloads keys, allowlist, listener grants and the public TLS certificates
                // from the same sources.
                let (reloader, file) = (server.reloader(), a.config.clone());
                let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                    .map_err(|e| Error::new(ErrorCode::Io, format!("cannot install the SIGHUP handler: {e}")))?;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match RelayConfig::load(file.as_deref(), &overrides).and_then(|cfg| reloader.reload(&cfg)) {
                            Ok(()) => eprintln!("reloaded keys, allowlist, listener grants and public TLS certificates"),
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
            say!("{}", ListenerKeyText::of(&id).lines(Some(&out)).trim_end());
            Ok(())
        }
        Cmd::Keygen { kid, .. } => {
            say!("{}", SharedKeyText::generate(kid).lines().trim_end());
            Ok(())
        }
        Cmd::Listen { to, pool, exit, allow, relay, key, name, tcp_port, proxy_protocol, h2c, tls_passthrough, ca, timeout, e2e, allow_peer } => {
            let options = ClientOptions { relay, key, ca, timeout, ..ClientOptions::default() };
            let mut b =
                options.resolve(ClientRole::Listener)?.listener_builder()?.tcp_port(tcp_port).pool(pool).h2c(h2c).tls_passthrough(tls_passthrough);
            if let (true, Some(rules)) = (exit, &allow) {
                b = b.exit(libtunnel::egress::Allowlist::from_json(rules, "--allow")?);
            }
            if let Some(n) = name {
                b = b.name(n);
            }
            if e2e {
                let mut cfg = libtunnel::e2e::ListenerE2e::new();
                for k in &allow_peer {
                    cfg = cfg.allow_peer(k)?;
                }
                b = b.e2e(cfg);
            }
            let listener = bind_with_retries(b).await?;
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
            if e2e {
                say!(
                    "e2e: on ({})",
                    if allow_peer.is_empty() {
                        "any dialer that verifies this key".to_string()
                    } else {
                        format!("{} admitted dialer keys", allow_peer.len())
                    }
                );
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
        Cmd::Status { admin, token } => {
            let token = token.or_else(|| std::env::var("TUNNEL_ADMIN_TOKEN").ok()).ok_or_else(|| {
                Error::new(ErrorCode::InvalidArgument, "no admin token: pass --token or set TUNNEL_ADMIN_TOKEN (the relay's admin_token)")
            })?;
            let listeners = admin_get(&admin, "/listeners", &token).await?;
            let sessions = admin_get(&admin, "/sessions", &token).await?;
            let rows = listeners.as_array().cloned().unwrap_or_default();
            say!("{:<28} {:<46} {:>8} {:>12} {:>9}", "LISTENER", "PUBLIC KEY", "STREAMS", "QUEUED B", "RTT MS");
            for r in &rows {
                let rtt = r["rtt_ms"].as_f64().map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
                say!(
                    "{:<28} {:<46} {:>8} {:>12} {:>9}",
                    r["name"].as_str().unwrap_or(""),
                    r["public_key"].as_str().unwrap_or(""),
                    r["streams"],
                    r["queued_bytes"],
                    rtt
                );
            }
            say!("{} listener(s); {} session(s) and {} stream(s) active", rows.len(), sessions["sessions_active"], sessions["streams_active"]);
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "tunnel", &mut out);
            say!("{}", String::from_utf8_lossy(&out).trim_end());
            Ok(())
        }
        Cmd::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut out)
                .map_err(|e| Error::new(ErrorCode::Io, format!("cannot render the man page: {e}")))?;
            say!("{}", String::from_utf8_lossy(&out).trim_end());
            Ok(())
        }
    }
}

/// GET `path` from a relay's admin endpoint with the bearer token; the JSON answer.
async fn admin_get(base: &str, path: &str, token: &str) -> Result<serde_json::Value, Error> {
    use http_body_util::BodyExt;
    let url = url::Url::parse(base)
        .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("--admin {base:?} is not a URL ({e}); e.g. http://127.0.0.1:7836")))?;
    if url.scheme() != "http" {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("--admin {base:?}: the admin endpoint speaks http:// (keep it on a private address)"),
        ));
    }
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(80);
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::new(ErrorCode::RelayUnavailable, format!("cannot reach the admin endpoint at {base}: {e}; is admin_listen set on the relay?"))
    };
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| unreachable(&e))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.map_err(|e| unreachable(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| Error::new(ErrorCode::General, format!("building the admin request: {e}")))?;
    let resp = send.send_request(req).await.map_err(|e| unreachable(&e))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        return Err(Error::new(ErrorCode::AuthFailed, "the admin endpoint refused the token; use the relay's admin_token (TUNNEL_ADMIN_TOKEN)"));
    }
    if !status.is_success() {
        return Err(Error::new(
            ErrorCode::General,
            format!("the admin endpoint answered {status} for {path}: {}", String::from_utf8_lossy(&body).trim()),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| Error::new(ErrorCode::Protocol, format!("the admin endpoint sent no JSON for {path}: {e}")))
}

/// Register a listener, retrying with backoff (1 s doubling to 30 s, each attempt logged) while
/// the relay cannot be reached: containers and boot order often start the listener first. What
/// retrying cannot fix (a refused key, a taken name, bad input) ends the command at once.
async fn bind_with_retries(b: libtunnel::ListenerBuilder) -> Result<libtunnel::Listener, Error> {
    let mut delay = Duration::from_secs(1);
    let mut attempt = 1u32;
    loop {
        match b.clone().bind().await {
            Ok(l) => return Ok(l),
            Err(e) if matches!(e.code(), ErrorCode::RelayUnavailable | ErrorCode::Timeout | ErrorCode::Io) => {
                tracing::warn!(attempt, retry_in_secs = delay.as_secs(), "cannot register with the relay yet: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The runtime a command runs on. The relay (and the demo, which embeds one) gets a worker per
/// core; client commands move one session's bytes, where a second worker mostly adds cross-thread
/// wake-ups per frame, so they run on one thread. `TUNNEL_WORKER_THREADS` overrides both.
fn runtime(cmd: &Cmd) -> Result<tokio::runtime::Runtime, Error> {
    libtunnel::runtime::build(if matches!(cmd, Cmd::Server(_) | Cmd::Demo) { Workers::PerCore } else { Workers::One })
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo narrates on stdout; its relay's logs (the refusals it stages included) would only
    // interleave with the story.
    let default_level = if matches!(cli.cmd, Cmd::Demo) { "error" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour).init();
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
