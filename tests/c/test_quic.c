/*
 * The C face over the QUIC transport: a quic:// relay URL with the relay's self-signed
 * certificate trusted through tunnel_config_set_ca_file, and no other new call. 1 MiB echoed and
 * hashed (FNV-1a) both ways with half-close; 1 MiB to a sink that answers the hash after our EOF;
 * a wrong key (TUNNEL_RESULT_AUTH_FAILED), a target outside the allowlist (NOT_ALLOWED), no CA
 * (the certificate is refused); a listener bound over quic:// accepting 1 MiB dialed by name
 * through the relay's wss:// URL and through quic://, echoed and hashed. Environment (from ffi/tests/c.rs):
 * TEST_QUIC, TEST_WSS, TEST_CA, TEST_KEY, TEST_WRONG_KEY, TEST_ECHO, TEST_SINK, TEST_DENIED,
 * TEST_IDENTITY. Prints TAP lines; exits non-zero if any check fails.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"

#define MIB (1u << 20)

static const char *env(const char *name) {
  const char *v = getenv(name);
  if (v == NULL) {
    fprintf(stderr, "test_quic: %s is not set\n", name);
    exit(2);
  }
  return v;
}

static tunnel_config *config(const char *relay, const char *ca) {
  tunnel_config *cfg = NULL;
  if (tunnel_config_new(relay, &cfg) != TUNNEL_RESULT_OK || tunnel_config_set_timeout_ms(cfg, 10000) != TUNNEL_RESULT_OK ||
      (ca != NULL && tunnel_config_set_ca_file(cfg, ca) != TUNNEL_RESULT_OK)) {
    fprintf(stderr, "test_quic: config for %s: %s\n", relay, last_err());
    exit(2);
  }
  return cfg;
}

static tunnel_dialer *make_dialer(const char *relay, const char *ca, const char *key) {
  tunnel_config *cfg = config(relay, ca);
  tunnel_dialer *d = NULL;
  if (tunnel_config_set_key(cfg, key) != TUNNEL_RESULT_OK || tunnel_dialer_new(cfg, &d) != TUNNEL_RESULT_OK) {
    fprintf(stderr, "test_quic: dialer for %s: %s\n", relay, last_err());
    exit(2);
  }
  tunnel_config_free(cfg);
  return d;
}

/* Send `total` bytes and read the echo at once (non-blocking, driven by poll), half-closing after
 * the last byte; the hash of what came back must equal the hash of what went out. */
static void echo_hashed(tunnel_dialer *d, const char *target, size_t total, const char *what) {
  int fd = -1;
  tunnel_result r = tunnel_dialer_dial(d, target, &fd);
  unsigned char out[65536], in[65536];
  size_t sent = 0, got = 0, i;
  uint64_t h_out = FNV_INIT, h_in = FNV_INIT;
  int shut = 0, eof = 0, ok = 1;

  check(r == TUNNEL_RESULT_OK && fd >= 0, "%s: dial %s (%s)", what, target, r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (r != TUNNEL_RESULT_OK) return;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  while (!eof && ok) {
    struct pollfd p;
    p.fd = fd;
    p.events = POLLIN | (sent < total ? POLLOUT : 0);
    p.revents = 0;
    if (poll(&p, 1, 10000) <= 0) {
      ok = 0;
      break;
    }
    if ((p.revents & POLLOUT) && sent < total) {
      size_t want = total - sent < sizeof out ? total - sent : sizeof out;
      ssize_t n;
      for (i = 0; i < want; i++) out[i] = (unsigned char)((sent + i) * 131 + 17);
      n = write(fd, out, want);
      if (n > 0) {
        h_out = fnv1a(h_out, out, (size_t)n);
        sent += (size_t)n;
      } else if (errno != EAGAIN) {
        ok = 0;
      }
      if (sent == total && !shut) shut = shutdown(fd, SHUT_WR) == 0 ? 1 : (ok = 0);
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = read(fd, in, sizeof in);
      if (n > 0) {
        h_in = fnv1a(h_in, in, (size_t)n);
        got += (size_t)n;
      } else if (n == 0) {
        eof = 1;
      } else if (errno != EAGAIN) {
        ok = 0;
      }
    }
  }
  check(ok && eof && shut && sent == total && got == total && h_in == h_out,
        "%s: echo of %zu bytes, hashed both ways, EOF after shutdown(SHUT_WR) (sent %zu, got %zu, %s)", what, total, sent, got,
        h_in == h_out ? "hashes equal" : "hashes differ");
  close(fd);
}

/* Write 1 MiB, half-close, then read the sink's verdict on the open half. */
static void half_close(tunnel_dialer *d, const char *target) {
  int fd = -1;
  unsigned char buf[65536];
  char reply[128], want[128];
  size_t sent = 0, got = 0, i;
  uint64_t h = FNV_INIT;
  ssize_t n;

  if (tunnel_dialer_dial(d, target, &fd) != TUNNEL_RESULT_OK) {
    check(0, "dial the sink over quic://: %s", last_err());
    return;
  }
  while (sent < MIB) {
    for (i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i ^ (sent >> 16) ^ 0x5a);
    n = write(fd, buf, sizeof buf);
    if (n <= 0) break;
    h = fnv1a(h, buf, (size_t)n);
    sent += (size_t)n;
  }
  check(shutdown(fd, SHUT_WR) == 0, "shutdown(SHUT_WR) on a quic:// tunnel fd");
  while (got < sizeof reply - 1 && (n = read(fd, reply + got, sizeof reply - 1 - got)) > 0) got += (size_t)n;
  reply[got] = '\0';
  snprintf(want, sizeof want, "%zu %016llx\n", sent, (unsigned long long)h);
  check(strcmp(reply, want) == 0, "the sink saw our 1 MiB and EOF over quic:// and answered: got \"%.*s\", want \"%.*s\"",
        (int)strcspn(reply, "\n"), reply, (int)strcspn(want, "\n"), want);
  close(fd);
}

/* The listener's side of one accepted stream: echo until EOF, then half-close. */
struct echo_side {
  int fd;
  size_t n;
};

static void *echo_back(void *arg) {
  struct echo_side *e = arg;
  unsigned char buf[65536];
  ssize_t k;
  while ((k = read(e->fd, buf, sizeof buf)) > 0) {
    ssize_t done = 0, x;
    e->n += (size_t)k;
    while (done < k && (x = write(e->fd, buf + done, (size_t)(k - done))) > 0) done += x;
  }
  shutdown(e->fd, SHUT_WR);
  return NULL;
}

struct accept_args {
  tunnel_listener *l;
  struct echo_side side;
  tunnel_result r;
  tunnel_peer peer;
};

static void *accept_and_echo(void *arg) {
  struct accept_args *a = arg;
  a->r = tunnel_listener_accept(a->l, 20000, &a->side.fd, &a->peer);
  if (a->r == TUNNEL_RESULT_OK) echo_back(&a->side);
  return NULL;
}

int main(void) {
  const char *quic = env("TEST_QUIC"), *wss = env("TEST_WSS"), *ca = env("TEST_CA"), *key = env("TEST_KEY"),
             *echo = env("TEST_ECHO"), *sink = env("TEST_SINK"), *denied = env("TEST_DENIED");
  tunnel_dialer *d = make_dialer(quic, ca, key), *bad = make_dialer(quic, ca, env("TEST_WRONG_KEY")),
                *untrusting = make_dialer(quic, NULL, key), *by_wss = make_dialer(wss, ca, key);
  tunnel_config *lc = config(quic, ca);
  tunnel_listener *l = NULL;
  char name[64], target[80];
  size_t n = 0;
  int fd = -7;
  tunnel_result r;

  check(strncmp(quic, "quic://localhost:", 17) == 0, "the relay URL is quic:// (%s)", quic);
  echo_hashed(d, echo, MIB, "dialer over quic://");
  half_close(d, sink);
  r = tunnel_dialer_dial(bad, echo, &fd);
  check_code(r, TUNNEL_RESULT_AUTH_FAILED, "refused", "a wrong key over quic://");
  check_code(tunnel_dialer_dial(d, denied, &fd), TUNNEL_RESULT_NOT_ALLOWED, denied, "a target outside the allowlist over quic://");
  r = tunnel_dialer_dial(untrusting, echo, &fd);
  check(r != TUNNEL_RESULT_OK && strstr(last_err(), "certificate") != NULL,
        "without tunnel_config_set_ca_file the self-signed relay is refused: %s (%s)", tunnel_result_name(r), last_err());
  check(fd == -7, "failed dials leave *out_fd alone");

  /* A listener over quic://, dialed by name through the relay's wss:// URL. */
  r = tunnel_config_set_identity_file(lc, env("TEST_IDENTITY"), true);
  check(r == TUNNEL_RESULT_OK, "listener identity (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  r = tunnel_listener_bind(lc, &l);
  check(r == TUNNEL_RESULT_OK, "a listener binds over quic:// (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (r == TUNNEL_RESULT_OK) {
    tunnel_dialer *dialers[2];
    const char *over[2] = {"a listener over quic://, dialed by name over wss://", "a listener over quic://, dialed by name over quic://"};
    int k;
    dialers[0] = by_wss;
    dialers[1] = d;
    tunnel_listener_name(l, name, sizeof name, &n);
    snprintf(target, sizeof target, "%s:0", name);
    for (k = 0; k < 2; k++) {
      struct accept_args a;
      pthread_t t;
      memset(&a, 0, sizeof a);
      a.l = l;
      a.side.fd = -1;
      pthread_create(&t, NULL, accept_and_echo, &a);
      echo_hashed(dialers[k], target, MIB, over[k]);
      pthread_join(t, NULL);
      check(a.r == TUNNEL_RESULT_OK && a.side.n == MIB, "%s: the listener accepted the stream and read 1 MiB (%s, %zu bytes)", over[k],
            tunnel_result_name(a.r), a.side.n);
      if (a.side.fd >= 0) close(a.side.fd);
    }
  }

  tunnel_listener_free(l);
  tunnel_config_free(lc);
  tunnel_dialer_free(by_wss);
  tunnel_dialer_free(untrusting);
  tunnel_dialer_free(bad);
  tunnel_dialer_free(d);
  return checks_summary();
}
