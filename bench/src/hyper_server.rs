//! `hyper-server`: the target of bench/http.sh's HTTPS and h2 runs. hyper's auto server answers
//! every request with the same 13-byte body, over TLS (`--cert`/`--key`; ALPN `h2` and
//! `http/1.1`) or plain (HTTP/1.1 and h2c with prior knowledge on one port), so the same server
//! is measured direct and behind a listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;

pub fn run(listen: SocketAddr, tls: Option<(PathBuf, PathBuf)>, threads: usize) -> std::io::Result<()> {
    let acceptor = match tls {
        Some((cert, key)) => {
            let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
                .map_err(|e| bad(format!("{}: {e}", cert.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("{}: {e}", cert.display())))?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).map_err(|e| bad(format!("{}: {e}", key.display())))?;
            let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| bad(e.to_string()))?;
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", l.local_addr()?);
        loop {
            let Ok((sock, _)) = l.accept().await else { continue };
            let _ = sock.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"Hello, world!"))))
                });
                let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match acceptor {
                    Some(a) => match a.accept(sock).await {
                        Ok(tls) => b.serve_connection(TokioIo::new(tls), svc).await,
                        Err(_) => return,
                    },
                    None => b.serve_connection(TokioIo::new(sock), svc).await,
                };
            });
        }
    })
}
