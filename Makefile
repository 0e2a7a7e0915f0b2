# The two commands of README.md, plus the pieces they are made of.
# One Cargo target dir (./target) serves the workspace, maturin and napi builds.

.PHONY: demo test test-rust build install dist clean

# A relay, a private demo service and dials through them, all on loopback.
# The build shows its progress (a fresh clone compiles for a few minutes), then the story.
demo:
	cargo build -p libtunnel --features cli --bin tunnel
	@echo
	"$${CARGO_TARGET_DIR:-target}/debug/tunnel" demo

# Every test of every language in the repo; installs what it needs first.
test:
	bash scripts/test.sh

build:
	cargo build -p libtunnel --features cli --bin tunnel

# The C face: header, libtunnel.so/.a and tunnel.pc under PREFIX (default /usr/local).
install:
	$(MAKE) -f ffi/install.mk install

# Release artifacts under dist/: the CLI and C tarballs, the Python wheel, the npm tarball.
dist:
	bash scripts/dist.sh

clean:
	cargo clean
