# Builds and installs the C face of libtunnel: include/tunnel.h, libtunnel.so (with its SONAME
# link) and libtunnel.a, and a tunnel.pc for pkg-config. From the repository root:
#
#   make -f ffi/install.mk install PREFIX=$HOME/.local        # builds (release) if needed
#   cc app.c $(pkg-config --cflags --libs tunnel)             # PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig
#
# Variables: PREFIX (/usr/local), LIBDIR, INCLUDEDIR, PKGCONFIGDIR, DESTDIR (staging),
# PROFILE (release), CARGO_TARGET_DIR (./target), BUILT (where the built libraries are),
# PC_PREFIX (the prefix tunnel.pc names; `make dist` sets '$${pcfiledir}/../..', so an unpacked
# tarball works wherever it lands).

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
PC_PREFIX ?= $(PREFIX)
DESTDIR ?=
PROFILE ?= release
CARGO ?= cargo
CARGO_TARGET_DIR ?= $(ROOT)/target
BUILT ?= $(CARGO_TARGET_DIR)/$(PROFILE)
INSTALL ?= install

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' $(ROOT)/Cargo.toml | head -n 1)
MAJOR := $(word 1,$(subst ., ,$(VERSION)))
MINOR := $(word 2,$(subst ., ,$(VERSION)))
SONAME := libtunnel.so.$(MAJOR).$(MINOR)
# tunnel.pc names libdir and includedir through $${prefix} when they lie under PREFIX.
pc_path = $(patsubst $(PREFIX)/%,$${prefix}/%,$(1))
# What a static link needs besides libtunnel.a (rustc --print native-static-libs).
PRIVATE_LIBS := -lpthread -ldl -lm -lrt -lutil -lgcc_s

.PHONY: build install uninstall

build:
	cd $(ROOT) && CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) $(CARGO) build -p libtunnel-ffi --profile $(if $(filter debug,$(PROFILE)),dev,$(PROFILE))

# Always through cargo, which rebuilds what is stale (a library older than its sources) and does
# nothing when it is current.
install: build
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL) -m 644 $(ROOT)/include/tunnel.h $(DESTDIR)$(INCLUDEDIR)/tunnel.h
	$(INSTALL) -m 755 $(BUILT)/libtunnel.so $(DESTDIR)$(LIBDIR)/libtunnel.so.$(VERSION)
	ln -sf libtunnel.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libtunnel.so
	$(INSTALL) -m 644 $(BUILT)/libtunnel.a $(DESTDIR)$(LIBDIR)/libtunnel.a
	printf '%s\n' \
	  'prefix=$(PC_PREFIX)' \
	  'libdir=$(call pc_path,$(LIBDIR))' \
	  'includedir=$(call pc_path,$(INCLUDEDIR))' \
	  '' \
	  'Name: tunnel' \
	  'Description: libtunnel: reverse tunnels and relays over one authenticated WebSocket (C API)' \
	  'Version: $(VERSION)' \
	  'Libs: -L$${libdir} -ltunnel' \
	  'Libs.private: $(PRIVATE_LIBS)' \
	  'Cflags: -I$${includedir}' \
	  > $(DESTDIR)$(PKGCONFIGDIR)/tunnel.pc

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/tunnel.h $(DESTDIR)$(LIBDIR)/libtunnel.so.$(VERSION) \
	  $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/libtunnel.so $(DESTDIR)$(LIBDIR)/libtunnel.a \
	  $(DESTDIR)$(PKGCONFIGDIR)/tunnel.pc
