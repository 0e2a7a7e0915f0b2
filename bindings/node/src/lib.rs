//! Node bindings of libtunnel (work in progress).
