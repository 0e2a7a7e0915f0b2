//! Python bindings of libtunnel (work in progress).
