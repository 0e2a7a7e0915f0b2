# The two commands of README.md, plus the pieces they are made of.
# One Cargo target dir (./target) serves the workspace, maturin and napi builds.

.PHONY: demo test test-rust build install clean

# A relay, a private demo service and dials through them, all on loopback.
demo:
	cargo run --quiet -p libtunnel --features cli --bin tunnel -- demo

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
