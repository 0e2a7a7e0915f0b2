// libtunnel's Emissary interop probe: our own code, built at test time against Encore's Emissary
// (go.encore.dev/emissary, MPL-2.0), which is fetched from the Go module proxy and never vendored.
//
// The require lines for go.encore.dev/emissary and go.encore.dev/emissary/server are added by the
// test harness (core/tests/emissary_interop.rs) in a scratch copy of this module, at
// $LIBTUNNEL_EMISSARY_VERSION (default: latest). Once the proxy serves a version, pin it here with
//   go get go.encore.dev/emissary@VERSION go.encore.dev/emissary/server@VERSION
// and commit go.mod and go.sum: the harness then uses the pinned versions as they are.
module libtunnel.invalid/interop/emissary

go 1.21
