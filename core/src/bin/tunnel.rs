//! The `tunnel` command: relay server, port forward, local SOCKS5 proxy, stdin/stdout dial,
//! key generation and the embedded demo. Thin: all behaviour lives in the `libtunnel` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[path = "tunnel/status_cluster.rs"]
mod status_cluster;

use clap::{Args, Parser, Subcommand};
use libtunnel::client::config::ClientVar;
use libtunnel::client::keys::{ListenerKeyText, SharedKeyText};
use libtunnel::client::{ClientEnv, ClientOptions, DialerOptions, ListenerOptions};
use libtunnel::config::{help_table, RelayConfig};
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
#[command(
    name = "tunnel",
    version,
    about = "Reach private TCP services through a relay over one authenticated WebSocket",
    after_help = "Logs go to stderr: -v / -q set the level, or RUST_LOG does when neither is given (e.g. \
                  RUST_LOG=info,libtunnel::conn=warn hides the per-connection lines); --log-format json for a log shipper."
)]
struct Cli {
    /// More log detail on stderr: -v debug, -vv trace (wins over RUST_LOG).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log detail on stderr: -q warnings and errors only, -qq errors only (wins over RUST_LOG).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log lines as text (default) or json (one JSON object per line, for log shippers).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How log lines are written on stderr.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
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
        /// Target (`host:port`), or as the exit sees it with --via.
        target: String,
        /// Reach the target through this exit listener (`tunnel listen --exit`), inside its network
        /// (`ProxyCommand tunnel dial --via office %h:%p`).
        #[arg(long, value_name = "NAME")]
        via: Option<String>,
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
        /// Relay URL (ws://, wss://, tcp://, grpc://, grpcs:// or quic://; several, comma-separated, in order of preference; default $TUNNEL_RELAY).
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
        /// Streams waiting to be forwarded to --to before the relay refuses more (default 128).
        #[arg(long, value_name = "N")]
        backlog: Option<usize>,
        /// Send a PROXY protocol v2 header with the original client address to the local service.
        #[arg(long)]
        proxy_protocol: bool,
        /// The local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server): public
        /// HTTP/1.1 and HTTP/2 requests reach it as HTTP/2.
        #[arg(long)]
        h2c: bool,
        /// The local service terminates TLS itself: the relay's HTTPS port passes connections
        /// whose SNI names this listener through undecrypted.
        #[arg(long)]
        tls_passthrough: bool,
        /// PEM file of CA certificates to trust for wss://, grpcs:// and quic:// (default $TUNNEL_CA, else the public Web PKI).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Seconds the registration may take (default $TUNNEL_TIMEOUT, else 20).
        #[arg(long)]
        timeout: Option<f64>,
        /// Reach the relay through this proxy: http://[user:pass@]host:port (CONNECT), https://…
        /// (TLS to the proxy), socks5://… (remote DNS), or `none` for a direct connection (default
        /// $TUNNEL_PROXY, else $HTTPS_PROXY / $HTTP_PROXY / $ALL_PROXY with $NO_PROXY, as curl).
        #[arg(long, value_name = "URL|none")]
        proxy: Option<String>,
        /// End-to-end encryption: terminate TLS 1.3 (with this key, which the name proves) on every
        /// stream and refuse plaintext ones, so the relay sees only ciphertext.
        #[arg(long)]
        e2e: bool,
        /// With --e2e, require dialers' own keys and admit this one (base64 public key or
        /// key-derived name). Repeatable.
        #[arg(long = "allow-peer", value_name = "KEY")]
        allow_peer: Vec<String>,
    },
    /// Make a key: a shared secret for dialers (default), a cluster's node key (--cluster), or an
    /// Ed25519 key (--listener) for a listener or an e2e dialer identity.
    Keygen {
        /// Key id (shared-secret keys).
        #[arg(long, default_value_t = 1)]
        kid: u32,
        /// Print the secret as TUNNEL_CLUSTER_KEY, the key every node of one relay cluster shares.
        #[arg(long, conflicts_with = "listener")]
        cluster: bool,
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
        /// The relay's admin endpoint: http://127.0.0.1:7836 or 127.0.0.1:7836.
        #[arg(long)]
        admin: String,
        /// The relay's admin token (default $TUNNEL_ADMIN_TOKEN, from the environment or ./.env).
        #[arg(long)]
        token: Option<String>,
        /// Show the whole cluster (every node and listener name, from Redis) instead of this relay.
        #[arg(long)]
        cluster: bool,
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
    /// Relay URL (ws://, wss://, tcp://, grpc://, grpcs:// or quic://; several, comma-separated, in order of preference; default $TUNNEL_RELAY).
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
    /// PEM file of CA certificates to trust for wss://, grpcs:// and quic:// (default $TUNNEL_CA, else the public Web PKI).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Seconds one dial may take (default $TUNNEL_TIMEOUT, else 20).
    #[arg(long)]
    timeout: Option<f64>,
    /// Reach the relay through this proxy: http://[user:pass@]host:port (CONNECT), https://…
    /// (TLS to the proxy), socks5://… (remote DNS), or `none` for a direct connection (default
    /// $TUNNEL_PROXY, else $HTTPS_PROXY / $HTTP_PROXY / $ALL_PROXY with $NO_PROXY, as curl).
    #[arg(long, value_name = "URL|none")]
    proxy: Option<String>,
    /// End-to-end encrypt dials to listener names (TLS 1.3 inside the tunnel; the listener's key
    /// must prove the name dialed, so the relay can neither read nor impersonate).
    #[arg(long)]
    e2e: bool,
    /// With --e2e, the key a chosen (relay-granted) name must have: NAME=KEY (base64 public key
    /// or key-derived name). Repeatable.
    #[arg(long = "e2e-pin", value_name = "NAME=KEY")]
    e2e_pin: Vec<String>,
    /// With --e2e, present this Ed25519 key file (`tunnel keygen --listener` makes one) to
    /// listeners that admit listed dialer keys (`--allow-peer`).
    #[arg(long = "e2e-identity", value_name = "FILE")]
    e2e_identity: Option<PathBuf>,
}

/// `--proxy URL|none`; a bad URL is named by its flag (never echoed: it may hold a password).
fn proxy_flag(text: &str) -> Result<libtunnel::client::Proxy, Error> {
    libtunnel::client::Proxy::parse(text).map_err(|e| Error::new(e.code(), format!("--proxy: {}", e.message())))
}

impl ClientArgs {
    fn options(&self) -> Result<ClientOptions, Error> {
        Ok(ClientOptions {
            relay: self.relay.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            timeout: self.timeout,
            mode: self.classic.then_some(Mode::Classic),
            proxy: self.proxy.as_deref().map(proxy_flag).transpose()?,
            ..ClientOptions::default()
        })
    }

    /// The dialer these flags describe; every dial goes through the exit listener `via` when given.
    fn dialer(&self, via: Option<String>) -> Result<Dialer, Error> {
        DialerOptions {
            client: self.options()?,
            via,
            e2e: self.e2e,
            e2e_pins: self.e2e_pin.clone(),
            e2e_identity: self.e2e_identity.as_ref().map(|p| p.to_string_lossy().into_owned()),
        }
        .dialer()
    }
}

#[derive(Args)]
struct ServerArgs {
    /// TOML config file (keys are the lower-case setting names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Set any relay setting, e.g. `--set listen=0.0.0.0:7835` (repeatable; `--help` lists the
    /// settings, `--set help` prints them with their defaults).
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
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> StopSignals {
        #[cfg(unix)]
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            // Both handlers are in place from here on (`ctrl_c()` would install its own only when
            // first polled: a Ctrl-C after "forwarding to:" but before then killed the process).
            #[cfg(unix)]
            int: signal(SignalKind::interrupt()).expect("install SIGINT handler"),
            #[cfg(unix)]
            term: signal(SignalKind::terminate()).expect("install SIGTERM handler"),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
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
            // Handlers first: a supervisor may stop the relay as soon as it reads that it is ready.
            let stop = shutdown_signal();
            // Machine-readable lines, so scripts can find the ports when listening on :0.
            say!("{}", server.ready_lines().trim_end());
            // Every endpoint is bound: tell systemd (Type=notify; nothing without NOTIFY_SOCKET).
            if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
                tracing::warn!("cannot tell systemd the relay is ready (NOTIFY_SOCKET): {e}");
            }
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
            server
                .run(async {
                    stop.await;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                })
                .await
        }
        Cmd::Forward { local, target, via, client } => {
            let target = libtunnel::dialer::route(&target, via.as_deref())?;
            let dialer = client.dialer(None)?;
            let listener = libtunnel::forward::bind_local(&local).await?;
            let addr = listener.local_addr().map_err(|e| Error::from_io(e, "local address"))?;
            let stop = shutdown_signal();
            say!("forwarding {addr} -> {target} via {}", dialer.relay());
            connect_at_start(&dialer).await?;
            libtunnel::forward::forward(listener, dialer, target, stop).await
        }
        Cmd::Socks { listen, via, client } => {
            let dialer = client.dialer(via)?;
            let listener = libtunnel::forward::bind_local(&listen).await?;
            let addr = listener.local_addr().map_err(|e| Error::from_io(e, "local address"))?;
            let stop = shutdown_signal();
            say!("socks5 proxy on {addr} via {}", dialer.relay());
            connect_at_start(&dialer).await?;
            libtunnel::forward::socks_proxy(listener, dialer, stop).await
        }
        Cmd::Dial { target, via, client } => {
            let target = libtunnel::dialer::route(&target, via.as_deref())?;
            let dialer = client.dialer(None)?;
            let stream = dialer.dial_target(&target).await?;
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
            let r = tokio::select! {
                r = &mut down => r,
                _ = up => down.await,
            };
            // End the session cleanly, so the relay logs a finished session, not a lost one.
            dialer.close().await;
            r.map(|_| ()).map_err(|e| stream_error(Error::from_io(e, "reading from the tunnel"), &target))
        }
        Cmd::Keygen { listener: true, out, .. } => {
            let out = out.ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "--listener needs --out FILE to write the private key to"))?;
            let id = libtunnel::Identity::generate();
            id.save(&out)?;
            say!("{}", ListenerKeyText::of(&id).lines(Some(&out)).trim_end());
            Ok(())
        }
        Cmd::Keygen { kid, cluster: true, .. } => {
            say!("{}", SharedKeyText::generate(kid).cluster_lines().trim_end());
            Ok(())
        }
        Cmd::Keygen { kid, .. } => {
            say!("{}", SharedKeyText::generate(kid).lines().trim_end());
            Ok(())
        }
        Cmd::Listen {
            to,
            pool,
            exit,
            allow,
            relay,
            key,
            name,
            tcp_port,
            backlog,
            proxy_protocol,
            h2c,
            tls_passthrough,
            ca,
            timeout,
            proxy,
            e2e,
            allow_peer,
        } => {
            let proxy = proxy.as_deref().map(proxy_flag).transpose()?;
            let b = ListenerOptions {
                client: ClientOptions { relay, key, ca, timeout, proxy, ..ClientOptions::default() },
                name,
                tcp_port,
                pool,
                h2c,
                tls_passthrough,
                backlog,
                exit: allow.clone().filter(|_| exit),
                // Without --to, streams to the name are refused (NOT_ALLOWED) before they are accepted.
                exit_only: exit && to.is_none(),
                e2e,
                allow_peers: allow_peer.clone(),
            }
            .builder()?;
            let listener = bind_with_retries(b).await?;
            let reg = listener.registration();
            let stop = shutdown_signal();
            // Machine-readable lines, so scripts can find what was granted.
            say!("listening as: {}", reg.name);
            // Only the ways in that this listener serves: an exit without --to serves none of
            // them, and an e2e listener only e2e dials.
            let serves = to.is_some();
            if serves {
                if e2e {
                    say!("dial: {}:0 --e2e (through any dialer of this relay; plaintext dials and public requests are refused)", reg.name);
                } else {
                    say!("dial: {}:0 (through any dialer of this relay)", reg.name);
                    if let Some(u) = &reg.http_url {
                        say!("http: {u}");
                    }
                    if let Some(u) = &reg.https_url {
                        say!("https: {u}");
                    }
                    if let Some(t) = &reg.tcp_addr {
                        say!("tcp: {t}");
                    }
                }
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
            // A stop drains: say so, and say when it is over (a pool's rolling restart).
            let stop = async {
                stop.await;
                say!(
                    "draining: {} (open streams get up to {} s; a second signal exits now)",
                    if pool { "retired from the pool, the relay sends new streams to the other replicas" } else { "taking no new streams" },
                    libtunnel::forward::DRAIN.as_secs()
                );
            };
            let finished = listener.finished();
            let r = match to {
                Some(to) => {
                    say!("forwarding to: {to}");
                    libtunnel::forward::expose(listener, to, proxy_protocol, stop).await
                }
                None => libtunnel::forward::exit_only(listener, stop).await,
            };
            // The listener was closed; its session's driver sends the WebSocket Close on its own
            // task, which exiting now would cut (the relay would log a failed transport).
            finished.await;
            if r.is_ok() {
                say!("exited: every stream finished");
            }
            r
        }
        Cmd::Demo => libtunnel::demo::run().await,
        Cmd::Status { admin, token, cluster } => {
            let token = match token {
                Some(t) => Some(t),
                None => ClientEnv::Process.var(&ADMIN_TOKEN_VAR)?,
            }
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidArgument,
                    "no admin token: pass --token or set TUNNEL_ADMIN_TOKEN (the relay's admin_token; ./.env is read too)",
                )
            })?;
            if cluster {
                let nodes = admin_get(&admin, "/cluster/nodes", &token).await?;
                let listeners = admin_get(&admin, "/cluster/listeners", &token).await?;
                say!("{}", status_cluster::table(&nodes, &listeners).trim_end());
                return Ok(());
            }
            let listeners = admin_get(&admin, "/listeners", &token).await?;
            let sessions = admin_get(&admin, "/sessions", &token).await?;
            say!("{}", status_table(&listeners, &sessions).trim_end());
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "tunnel", &mut out);
            say!("{}", String::from_utf8_lossy(&out).trim_end());
            Ok(())
        }
        Cmd::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(command()).render(&mut out).map_err(|e| Error::new(ErrorCode::Io, format!("cannot render the man page: {e}")))?;
            say!("{}", String::from_utf8_lossy(&out).trim_end());
            Ok(())
        }
    }
}

/// `TUNNEL_ADMIN_TOKEN`, which `tunnel status` reads like the client variables (environment, then
/// `./.env`).
const ADMIN_TOKEN_VAR: ClientVar = ClientVar { name: "TUNNEL_ADMIN_TOKEN", help: "the relay's admin token", old_names: &[] };

/// Open a forward's or proxy's session at start (multiplexed mode): a refusal (a wrong key, ...)
/// is final and ends the command, as `ssh -L` does; a relay that cannot be reached yet is
/// retried on the first connection.
async fn connect_at_start(dialer: &Dialer) -> Result<(), Error> {
    if dialer.mode() == Mode::Multiplexed {
        match dialer.connect().await {
            Ok(()) => {}
            Err(e) if e.code().is_final() => return Err(e),
            Err(e) => tracing::warn!("{e} (will retry on the first connection)"),
        }
    }
    Ok(())
}

/// A dialed stream's error with its cause spelled out: a listener's refusal arrives as a reset
/// carrying its code.
fn stream_error(e: Error, target: &Target) -> Error {
    match e.code() {
        ErrorCode::E2eRefused => Error::new(
            ErrorCode::E2eRefused,
            format!("the listener {} refused this stream: it takes only end-to-end encrypted dials; dial it with --e2e", target.host),
        ),
        _ => e,
    }
}

/// `tunnel status`'s table: one row per listener session (a pool's replicas marked), columns as
/// wide as their widest cell, then the totals.
fn status_table(listeners: &serde_json::Value, sessions: &serde_json::Value) -> String {
    let rows = listeners.as_array().cloned().unwrap_or_default();
    let count = |n: &str| rows.iter().filter(|r| r["name"].as_str() == Some(n)).count();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut table = vec![["LISTENER", "KIND", "PUBLIC KEY", "STREAMS", "QUEUED B", "RTT MS"].map(String::from).to_vec()];
    for r in &rows {
        let name = r["name"].as_str().unwrap_or("").to_string();
        let replicas = count(&name);
        let nth = seen.entry(name.clone()).and_modify(|n| *n += 1).or_insert(1);
        let mut kind = Vec::new();
        if r["pool"].as_bool().unwrap_or(false) || replicas > 1 {
            kind.push(format!("pool {nth}/{replicas}"));
        }
        if r["exit"].as_bool().unwrap_or(false) {
            kind.push("exit".into());
        }
        let num = |v: &serde_json::Value| v.as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        table.push(vec![
            name,
            if kind.is_empty() { "-".into() } else { kind.join(", ") },
            r["public_key"].as_str().unwrap_or("-").to_string(),
            num(&r["streams"]),
            num(&r["queued_bytes"]),
            r["rtt_ms"].as_f64().map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|c| table.iter().map(|row| row[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            // Text left-aligned, numbers right-aligned.
            .map(|(c, v)| if c < 3 { format!("{v:<w$}", w = widths[c]) } else { format!("{v:>w$}", w = widths[c]) })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let names: std::collections::HashSet<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    let n = |k: &str| sessions[k].as_i64().unwrap_or(0);
    out.push_str(&format!(
        "{} listener session(s) under {} name(s); {} dialer session(s); {} stream(s) open\n",
        n("listener_sessions"),
        names.len(),
        n("dialer_sessions"),
        n("streams_active")
    ));
    out
}

/// GET `path` from a relay's admin endpoint with the bearer token; the JSON answer. `base` may
/// leave out the scheme (`127.0.0.1:7836`).
async fn admin_get(base: &str, path: &str, token: &str) -> Result<serde_json::Value, Error> {
    use http_body_util::BodyExt;
    let with_scheme = if base.contains("://") { base.to_string() } else { format!("http://{base}") };
    let url = url::Url::parse(&with_scheme)
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
            Err(e) if !e.code().is_final() => {
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

/// The command line, with the settings listed under `tunnel server --help` (and in the man page).
fn command() -> clap::Command {
    let list = format!(
        "Settings: each is `--set NAME=VALUE`, the variable TUNNEL_NAME (also in ./.env), or NAME in the --config TOML file.\n\n{}",
        help_table()
    );
    <Cli as clap::CommandFactory>::command().mut_subcommand("server", |c| c.after_long_help(list))
}

/// Log to stderr: -v/-q when given, else RUST_LOG, else `default_level`; as text or JSON.
fn init_logging(cli: &Cli, default_level: &str) {
    let flagged = match (cli.verbose, cli.quiet) {
        (0, 0) => None,
        (1, _) => Some("debug"),
        (v, _) if v > 1 => Some("trace"),
        (_, 1) => Some("warn"),
        _ => Some("error"),
    };
    let filter = match flagged {
        Some(level) => tracing_subscriber::EnvFilter::new(level),
        None => tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => {
            // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
            let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            builder.with_ansi(colour).init()
        }
    }
}

/// glibc's allocator returns freed memory to the kernel eagerly by default (blocks of 128 KiB and
/// more are mapped and unmapped one by one, and a free heap top over 128 KiB is trimmed), so on
/// the data path every transport read buffer and frame batch came back as fresh pages: the
/// profile of `tunnel forward` + `tunnel server` moving 1 GiB through one stream counted 54,000 to
/// 184,000 page faults in the relay (the kernel zeroing each page) and about a third of its CPU.
/// Blocks under 1 MiB now come from the heap, and a free heap top is kept up to `keep_top`:
/// 8 MiB for the client commands (~400 faults per GiB), 1 MiB for a relay, because
/// `malloc_trim` (relay/memory.rs, after a flood) cannot shrink a thread arena's top and a relay
/// with 8 MiB kept up to 8 MiB per arena after its connections closed. Measured with
/// `tunnel-bench throughput` through `forward` + `server`, 512 MiB: relay faults 470 / 2,800 /
/// 5,900 at 1 / 8 / 32 streams with 1 MiB (550 / 930 at 1 / 8 with 8 MiB); the forward with 1 MiB
/// took 70,000 at 8 streams, hence 8 MiB there. `GLIBC_TUNABLES` (glibc.malloc.*), when set, is
/// left to decide.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator(keep_top: i32) {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only sets the allocator's parameters; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, keep_top);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator(_keep_top: i32) {}

fn main() -> ExitCode {
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    tune_allocator(if matches!(cli.cmd, Cmd::Server(_) | Cmd::Demo) { 1 << 20 } else { 8 << 20 });
    // The demo narrates on stdout; its relay's logs (the refusals it stages included) would only
    // interleave with the story.
    init_logging(&cli, if matches!(cli.cmd, Cmd::Demo) { "error" } else { "info" });
    if let Cmd::Server(a) = &mut cli.cmd {
        if a.set.iter().any(|s| s == "help") {
            say!("{}", help_table().trim_end());
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
    let starting_refusal = matches!(cli.cmd, Cmd::Forward { .. } | Cmd::Socks { .. });
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
                // Refused at start (`tunnel forward` with a wrong key), like ssh -L.
                ErrorCode::AuthFailed if starting_refusal => 2,
                _ => 1,
            })
        }
    }
}
