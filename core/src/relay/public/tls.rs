//! TLS on the public HTTPS port (`https_listen`). Certificates come from `public_tls_cert` /
//! `public_tls_key` (one or several PEM pairs, a wildcard `*.<domain>` typically) and are chosen
//! per connection by the ClientHello's SNI: the first certificate valid for the name (wildcards
//! included, checked by webpki), else the first one. A reload (SIGHUP) reads the files again and
//! swaps the whole set, so new connections get the new certificates and open ones keep theirs.
//! ALPN offers `h2` and `http/1.1`.
//!
//! Before any of that, [`read_client_hello`] reads the ClientHello (bounded) and hands back its
//! bytes and SNI: a connection for a TLS-passthrough listener is routed with those bytes
//! replayed, undecrypted (the relay holds no key for that name).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;

use crate::config::RelayConfig;
use crate::error::{Error, Result};

/// The public port's certificates, replaced whole on reload.
#[derive(Debug)]
struct SniCerts {
    current: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
}

impl SniCerts {
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let list = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let fits = |ck: &Arc<CertifiedKey>, name: &ServerName<'_>| {
            let Some(der) = ck.cert.first() else { return false };
            webpki::EndEntityCert::try_from(der).is_ok_and(|c| c.verify_is_valid_for_subject_name(name).is_ok())
        };
        let chosen = sni.and_then(|s| ServerName::try_from(s).ok()).and_then(|name| list.iter().find(|ck| fits(ck, &name)).cloned());
        chosen.or_else(|| list.first().cloned())
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// TLS for the public HTTPS port.
pub(crate) struct PublicTls {
    certs: Arc<SniCerts>,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn load_pair(cert: &PathBuf, key: &PathBuf) -> Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::config(format!("cannot read TUNNEL_PUBLIC_TLS_CERT {}: {e}", cert.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::config(format!("TUNNEL_PUBLIC_TLS_CERT {} is not valid PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::config(format!("TUNNEL_PUBLIC_TLS_CERT {} holds no certificate", cert.display())));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::config(format!("TUNNEL_PUBLIC_TLS_KEY {} holds no usable private key: {e}", key.display())))?;
    let ck = CertifiedKey::from_der(chain, der, &crate::transport::provider())
        .map_err(|e| Error::config(format!("TUNNEL_PUBLIC_TLS_KEY {} does not fit TUNNEL_PUBLIC_TLS_CERT {}: {e}", key.display(), cert.display())))?;
    Ok(Arc::new(ck))
}

fn load_all(cfg: &RelayConfig) -> Result<Vec<Arc<CertifiedKey>>> {
    cfg.public_tls_cert.iter().zip(&cfg.public_tls_key).map(|(c, k)| load_pair(c, k)).collect()
}

impl PublicTls {
    /// Load the certificates; `None` when none is configured.
    pub(crate) fn from_config(cfg: &RelayConfig) -> Result<Option<PublicTls>> {
        if cfg.public_tls_cert.is_empty() {
            return Ok(None);
        }
        let certs = Arc::new(SniCerts { current: RwLock::new(Arc::new(load_all(cfg)?)) });
        let mut config = rustls::ServerConfig::builder_with_provider(crate::transport::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(PublicTls { certs, acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) }))
    }

    /// Read the certificate files again; on error the old ones stay.
    pub(crate) fn reload(&self, cfg: &RelayConfig) -> Result<()> {
        if cfg.public_tls_cert.is_empty() {
            return Err(Error::config("the reloaded config has no TUNNEL_PUBLIC_TLS_CERT; the HTTPS port needs one (keeping the old certificates)"));
        }
        let fresh = load_all(cfg)?;
        tracing::info!(certificates = fresh.len(), "reloaded the public TLS certificates");
        *self.certs.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// Read a TLS ClientHello (at most `max` bytes): the bytes read, to replay, and its SNI. `None`
/// when the peer closes, sends something else than TLS, or more than `max` bytes without
/// completing one.
pub(crate) async fn read_client_hello<R: tokio::io::AsyncRead + Unpin>(io: &mut R, max: usize) -> Option<(Vec<u8>, Option<String>)> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        if buf.len() >= max {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let room = (max - buf.len()).min(chunk.len());
        let n = io.read(&mut chunk[..room]).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        while fed < buf.len() {
            let mut rd = &buf[fed..];
            match acceptor.read_tls(&mut rd) {
                Ok(0) | Err(_) => return None,
                Ok(k) => fed += k,
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
                return Some((buf, sni));
            }
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
}
