//! The C ABI of libtunnel (work in progress).
