# The two commands of README.md, plus the pieces they are made of.
# One Cargo target dir (./target) serves the workspace, maturin and napi builds.

.PHONY: demo test test-rust build install clean

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

clean:
	cargo clean
