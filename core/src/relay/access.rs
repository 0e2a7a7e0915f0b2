//! Who may do what on the relay: the keys, the allowlist, which listener key may hold which
//! name ([`Access::authorize`]) and which dialer key may use which exit. Replaced whole by a
//! reload; every new session, registration and stream reads the current one.

use std::collections::HashMap;

use crate::config::RelayConfig;
use crate::egress::allowlist;
use crate::error::{Error, ErrorCode, Result};

/// The part of the config a running relay can reload (SIGHUP, [`ServerHandle::reload`]): every
/// new session, registration and stream is checked against the current one.
pub(crate) struct Access {
    pub(crate) auth_keys: crate::auth::KeySet,
    pub(crate) allow: allowlist::Allowlist,
    /// Listener public keys, with the chosen names each may register.
    pub(crate) listener_grants: HashMap<[u8; 32], Vec<String>>,
    pub(crate) listeners_open: bool,
    /// Exit listener names, with the dialer key ids that may use each.
    pub(crate) exits: HashMap<String, Vec<u32>>,
}

impl Access {
    pub(super) fn from_config(cfg: &RelayConfig) -> Result<Access> {
        cfg.check_serves_someone("TUNNEL_AUTH_KEYS", "TUNNEL_ALLOW")?;
        let mut listener_grants = HashMap::new();
        for g in &cfg.listener_keys {
            let pk = crate::identity::parse_public_key(&g.public_key)?;
            listener_grants.entry(pk).or_insert_with(Vec::new).extend(g.names.iter().cloned());
        }
        let mut exits = HashMap::new();
        for g in &cfg.exits {
            exits.entry(g.name.clone()).or_insert_with(Vec::new).extend(g.key_ids.iter().copied());
        }
        Ok(Access { auth_keys: cfg.auth_keys.clone(), allow: cfg.allow.clone(), listener_grants, listeners_open: cfg.listeners_open, exits })
    }
}

impl Access {
    /// Whether sessions of key id `kid` may reach targets through the exit listener `exit`.
    pub(crate) fn exit_permits(&self, exit: &str, kid: u32) -> bool {
        self.exits.get(exit).is_some_and(|kids| kids.contains(&kid))
    }

    /// Decide whether `public_key` may register `name`.
    pub(crate) fn authorize(&self, public_key: &[u8; 32], name: &str) -> Result<()> {
        if !crate::identity::valid_name(name) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("{name:?} is not a valid listener name: use 1-63 lowercase letters, digits and '-'"),
            ));
        }
        let granted = self.listener_grants.get(public_key);
        if name == crate::identity::derived_name(public_key) {
            if granted.is_some() || self.listeners_open {
                return Ok(());
            }
            return Err(Error::new(
                ErrorCode::NotAllowed,
                "this listener key is not listed on the relay; add its public key to TUNNEL_LISTENER_KEYS (or set TUNNEL_LISTENERS_OPEN=true)",
            ));
        }
        if granted.is_some_and(|names| names.iter().any(|n| n == name)) {
            return Ok(());
        }
        let owned_by_other = self
            .listener_grants
            .iter()
            .any(|(k, names)| k != public_key && (crate::identity::derived_name(k) == name || names.iter().any(|n| n == name)));
        if owned_by_other || name.len() == crate::identity::DERIVED_NAME_LEN {
            return Err(Error::new(
                ErrorCode::NameTaken,
                format!("the name {name:?} belongs to another key; register your key's own name or one the relay grants you"),
            ));
        }
        Err(Error::new(
            ErrorCode::NotAllowed,
            format!("the relay does not grant the name {name:?} to this key; list it under this key in TUNNEL_LISTENER_KEYS"),
        ))
    }
}
