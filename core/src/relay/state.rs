//! The relay's shared state: what every connection task of one relay reads (its config and
//! counters, the shutdown tokens and task tracker, the name registry, the current [`Access`], the
//! admission guards, the public endpoints' state, the cluster). Built once by `Server::bind`;
//! each room of the relay takes it as `Arc<RelayState>`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::Access;
use super::metrics::Metrics;
use super::{cluster, guard, public, registry};
use crate::config::RelayConfig;
use crate::egress::resolve;
use crate::error::{ErrorCode, Result};

/// State shared by every connection task of one relay.
pub(crate) struct RelayState {
    pub(crate) cfg: RelayConfig,
    pub(crate) metrics: Arc<Metrics>,
    /// TLS for the WebSocket endpoint, when a certificate is configured.
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Cancelled when shutdown begins: stop accepting, send `GoAway`.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain deadline passes: close everything.
    pub(crate) kill: CancellationToken,
    /// Every connection and stream task, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Resolves target names (custom DNS servers or the system resolver).
    pub(crate) resolver: resolve::TargetResolver,
    /// Listener names and their sessions.
    pub(crate) registry: registry::Registry,
    /// Who may do what (keys, allowlist, listener grants): replaced whole by a reload.
    pub(super) access: std::sync::RwLock<Arc<Access>>,
    /// The public HTTP port, when enabled.
    pub(super) http_port: Option<u16>,
    /// The public HTTPS port, when enabled.
    pub(super) https_port: Option<u16>,
    /// Admission: connections and handshakes per source and in all, failed authentications,
    /// sessions per key.
    pub(crate) guards: guard::Guards,
    /// The nonces of the early hellos taken recently (each is taken once).
    pub(crate) early_nonces: super::session::EarlyNonces,
    /// The public endpoints' own state: request counts, h2 connections, rate windows, TLS.
    pub(crate) public: public::Public,
    /// The cluster this relay is a node of (`cluster_redis`), if any.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
}

impl RelayState {
    /// The current keys, allowlist and listener grants.
    pub(crate) fn access(&self) -> Arc<Access> {
        self.access.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn reload(&self, cfg: &RelayConfig) -> Result<()> {
        let access = Access::from_config(cfg)?;
        resolve::note_allow_rules(&cfg.allow, "the relay")?;
        if let Some(tls) = &self.public.tls {
            tls.reload(cfg)?;
        }
        tracing::info!(
            key_ids = ?access.auth_keys.kids(),
            listener_keys = access.listener_grants.len(),
            "reloaded keys, allowlist and listener grants; new sessions, registrations and streams use them"
        );
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(access);
        // Listeners whose key lost its name are told why and closed.
        for (name, owner, session) in self.registry.live() {
            if let Err(e) = self.access().authorize(&owner, &name) {
                tracing::info!(%name, reason = %e, "closing a listener whose key no longer holds its name");
                session.close_with_notice(
                    ErrorCode::NotAllowed,
                    format!("the relay's configuration no longer grants {name:?} to this key: {}", e.message()),
                );
            }
        }
        Ok(())
    }

    /// The public URL routed to a listener name, when the relay has an HTTP port.
    pub(crate) fn public_http_url(&self, name: &str) -> Option<String> {
        let port = self.http_port?;
        Some(if port == 80 { format!("http://{name}.{}", self.cfg.domain) } else { format!("http://{name}.{}:{port}", self.cfg.domain) })
    }

    /// The Prometheus text of `/metrics`: the counters, and the listener sessions from the
    /// registry (what `/sessions` reports as `listener_sessions`).
    pub(crate) fn metrics_text(&self) -> String {
        let mut s = self.metrics.render();
        s.push_str(&format!(
            "# HELP libtunnel_listener_sessions_active Listener sessions registered now (a pool counts each replica).\n# TYPE libtunnel_listener_sessions_active gauge\nlibtunnel_listener_sessions_active {}\n",
            self.registry.live().len()
        ));
        s
    }

    /// The public HTTPS URL of listener `name`, if the relay has an HTTPS port.
    pub(crate) fn public_https_url(&self, name: &str) -> Option<String> {
        let port = self.https_port?;
        Some(if port == 443 { format!("https://{name}.{}", self.cfg.domain) } else { format!("https://{name}.{}:{port}", self.cfg.domain) })
    }
}
