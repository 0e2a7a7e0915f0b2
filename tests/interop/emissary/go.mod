// libtunnel's Emissary interop probe: our own code, built at test time against Encore's Emissary
// (go.encore.dev/emissary, MPL-2.0) from the source snapshot beside the repository
// (../shared/emissary, or $LIBTUNNEL_EMISSARY_DIR). The test harness (core/tests/it/emissary_interop.rs)
// copies that snapshot to a scratch directory and adds the require and replace lines for it there;
// Emissary's own dependencies come from the Go module proxy.
module libtunnel.invalid/interop/emissary

go 1.21
