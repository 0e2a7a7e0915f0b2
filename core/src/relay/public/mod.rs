//! Everything the relay serves to the public: the HTTP port and the HTTPS port (HTTP/1.1, h2,
//! TLS passthrough by SNI; `endpoint`, with `tls` for the certificates and the ClientHello), the
//! bodies it forwards (`body`, `h2_window`), and what it knows about each listener it serves
//! publicly and the HTTP/2 connections it keeps to h2c listeners (`listeners`), and the
//! listeners' public TCP ports (`tcp_ports`).

pub(crate) mod body;
pub(crate) mod endpoint;
pub(crate) mod h2_window;
pub(crate) mod listeners;
pub(crate) mod tcp_ports;
pub(crate) mod tls;
