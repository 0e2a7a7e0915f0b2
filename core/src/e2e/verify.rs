//! The identity checks of an E2E handshake, as rustls hooks: [`ListenerCheck`] (dialer side: the
//! listener's raw key must derive the expected name), [`DialerCheck`] (listener side: in mutual
//! mode the dialer's raw key must be on the allow list) and [`DialerKey`] (the dialer's identity,
//! recording whether the listener asked for it). Only Ed25519 raw public keys and TLS 1.3 pass.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};

use super::keys::{key_of, provider};
use crate::error::{Error, ErrorCode};
use crate::identity::derived_name;

fn tls13_signature(message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(cert.as_ref()),
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered)
}

/// Dialer side, one per dial: the listener dialed as `dialed` must present the Ed25519 key whose
/// derived name is `expect`. A mismatch is kept in `failure` (with the key seen) for the dialer's
/// error, since rustls reports only a generic certificate error.
#[derive(Debug)]
pub(crate) struct ListenerCheck {
    pub(crate) dialed: String,
    pub(crate) expect: String,
    pub(crate) failure: Mutex<Option<Error>>,
}

impl ListenerCheck {
    fn fail(&self, message: String) -> rustls::Error {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Error::new(ErrorCode::E2eIdentity, message));
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
    }

    pub(crate) fn take_failure(&self) -> Option<Error> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl ServerCertVerifier for ListenerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(key) = key_of(end_entity) else {
            return Err(self.fail(format!(
                "listener {} did not present an Ed25519 key, so it cannot prove its name; is it a libtunnel listener started with e2e?",
                self.dialed
            )));
        };
        let got = derived_name(&key);
        if got == self.expect {
            return Ok(ServerCertVerified::assertion());
        }
        let pinned = if self.expect == self.dialed { String::new() } else { format!(" (pinned: {})", self.expect) };
        Err(self.fail(format!(
            "listener {}{pinned} answered with the key of {got}: the relay, or a listener it let in, is impersonating it; nothing was sent. \
             Check the name you dialed, or the pinned key if the listener's key really changed",
            self.dialed
        )))
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Listener side, one per listener: in mutual mode, require the dialer's key and admit the
/// listed ones. Without mutual mode no client key is asked for (raw keys are still what the
/// handshake negotiates, so a dialer that has an identity is never turned away for it).
#[derive(Debug)]
pub(crate) struct DialerCheck {
    pub(crate) cfg: super::ListenerE2e,
}

impl ClientCertVerifier for DialerCheck {
    fn offer_client_auth(&self) -> bool {
        self.cfg.is_mutual()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let Some(key) = key_of(end_entity) else {
            tracing::info!("refused an E2E dialer that presented no Ed25519 key");
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        };
        let name = derived_name(&key);
        if self.cfg.admits(&name) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::info!(dialer = %name, "refused an E2E dialer whose key is not allowed (add it with --allow-peer)");
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The dialer's identity for one dial (or none), noting whether the listener asked for it: only
/// then does the dialer wait for the listener's admission byte.
#[derive(Debug)]
pub(crate) struct DialerKey {
    pub(crate) key: Option<Arc<CertifiedKey>>,
    pub(crate) asked: AtomicBool,
}

impl DialerKey {
    pub(crate) fn was_asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }
}

impl ResolvesClientCert for DialerKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn only_raw_public_keys(&self) -> bool {
        true
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}
