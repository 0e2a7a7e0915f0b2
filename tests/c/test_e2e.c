/*
 * End-to-end encryption from C: a listener with tunnel_config_set_e2e and one admitted dialer key
 * (tunnel_config_add_listener_allow_peer), a dialer presenting that key, 4 MiB dialed by name and echoed
 * by the listener's side, hashed (FNV-1a) as sent, as the listener read it, and as echoed, with
 * half-close both ways; the peer reports e2e and the dialer's name; a dialer without the key
 * gets TUNNEL_RESULT_E2E_REFUSED and a bad pin TUNNEL_RESULT_INVALID_ARGUMENT.
 * Environment (from ffi/tests/c.rs): TEST_RELAY, TEST_KEY, TEST_LISTENER_ID and TEST_DIALER_ID
 * (key files), TEST_DIALER_KEY (the dialer's base64 public key), TEST_DIALER_NAME.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"

#define TOTAL (4u << 20)

static const char *env(const char *k) {
  const char *v = getenv(k);
  if (v == NULL) {
    fprintf(stderr, "test_e2e: %s must be set\n", k);
    exit(2);
  }
  return v;
}

static unsigned char pattern(size_t i) { return (unsigned char)((i * 2654435761u) >> 13); }

struct side {
  int fd;
  uint64_t hash;
  size_t n;
};

/* Write TOTAL pattern bytes, then half-close. */
static void *writer(void *arg) {
  struct side *s = arg;
  unsigned char buf[65536];
  size_t off = 0, i;
  s->hash = FNV_INIT;
  while (off < TOTAL) {
    size_t k = sizeof buf < TOTAL - off ? sizeof buf : TOTAL - off;
    ssize_t w, done = 0;
    for (i = 0; i < k; i++) buf[i] = pattern(off + i);
    s->hash = fnv1a(s->hash, buf, k);
    while ((size_t)done < k) {
      w = write(s->fd, buf + done, k - (size_t)done);
      if (w <= 0) return NULL;
      done += w;
    }
    off += k;
    s->n = off;
  }
  shutdown(s->fd, SHUT_WR);
  return NULL;
}

/* Read to EOF, hashing. */
static void *reader(void *arg) {
  struct side *s = arg;
  unsigned char buf[65536];
  ssize_t r;
  s->hash = FNV_INIT;
  while ((r = read(s->fd, buf, sizeof buf)) > 0) {
    s->hash = fnv1a(s->hash, buf, (size_t)r);
    s->n += (size_t)r;
  }
  return NULL;
}

static tunnel_config *config(const char *relay) {
  tunnel_config *cfg = NULL;
  if (tunnel_config_new(relay, &cfg) != TUNNEL_RESULT_OK) {
    fprintf(stderr, "test_e2e: config: %s\n", last_err());
    exit(2);
  }
  return cfg;
}

int main(void) {
  const char *relay = env("TEST_RELAY"), *key = env("TEST_KEY"), *lid = env("TEST_LISTENER_ID"), *did = env("TEST_DIALER_ID"),
             *dkey = env("TEST_DIALER_KEY"), *dname = env("TEST_DIALER_NAME");
  tunnel_config *lc = config(relay), *dc = config(relay), *bare = config(relay);
  tunnel_listener *l = NULL;
  tunnel_dialer *d = NULL, *stranger = NULL;
  tunnel_peer peer;
  char name[64], target[80];
  size_t n = 0;
  int out = -1, in = -1, none = -1;
  tunnel_result r;

  check(tunnel_config_set_identity_file(lc, lid, false) == TUNNEL_RESULT_OK && tunnel_config_set_e2e(lc, true) == TUNNEL_RESULT_OK &&
            tunnel_config_add_listener_allow_peer(lc, dkey) == TUNNEL_RESULT_OK,
        "listener config: identity, e2e, allowed dialer key");
  check_code(tunnel_config_add_listener_allow_peer(lc, "not-a-key"), TUNNEL_RESULT_INVALID_ARGUMENT, "keygen", "a malformed peer key");
  check_code(tunnel_config_add_e2e_pin(dc, "api"), TUNNEL_RESULT_INVALID_ARGUMENT, "NAME=KEY", "a pin without '='");
  r = tunnel_listener_bind(lc, &l);
  check(r == TUNNEL_RESULT_OK, "e2e listener binds (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (r != TUNNEL_RESULT_OK) return checks_summary();
  tunnel_listener_name(l, name, sizeof name, &n);
  snprintf(target, sizeof target, "%s:0", name);

  check(tunnel_config_set_key(dc, key) == TUNNEL_RESULT_OK && tunnel_config_set_identity_file(dc, did, false) == TUNNEL_RESULT_OK &&
            tunnel_config_set_e2e(dc, true) == TUNNEL_RESULT_OK && tunnel_dialer_new(dc, &d) == TUNNEL_RESULT_OK,
        "e2e dialer with its own identity");
  r = tunnel_dialer_dial(d, target, &out);
  check(r == TUNNEL_RESULT_OK, "e2e dial by name (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  r = tunnel_listener_accept(l, 10000, &in, &peer);
  check(r == TUNNEL_RESULT_OK, "accept (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (out < 0 || in < 0) return checks_summary();
  check(peer.e2e && strcmp(peer.dialer_name, dname) == 0, "peer is e2e and names the dialer (%s)", peer.dialer_name);

  {
    /* dialer writes; the listener's side echoes; a third thread reads the echo. */
    struct side w = {out, 0, 0}, back = {out, 0, 0}, seen = {in, FNV_INIT, 0};
    pthread_t tw, tr;
    unsigned char buf[65536];
    ssize_t k;
    pthread_create(&tw, NULL, writer, &w);
    pthread_create(&tr, NULL, reader, &back);
    while ((k = read(in, buf, sizeof buf)) > 0) {
      ssize_t done = 0, x;
      seen.hash = fnv1a(seen.hash, buf, (size_t)k);
      seen.n += (size_t)k;
      while (done < k && (x = write(in, buf + done, (size_t)(k - done))) > 0) done += x;
    }
    check(k == 0, "the listener's side reads the dialer's EOF (half-close)");
    shutdown(in, SHUT_WR);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    check(seen.n == TOTAL && seen.hash == w.hash, "the listener's side read the 4 MiB in plaintext, intact (%zu bytes)", seen.n);
    check(back.n == TOTAL && back.hash == w.hash, "the echo came back intact (%zu bytes)", back.n);
  }
  close(out);
  close(in);

  check(tunnel_config_set_key(bare, key) == TUNNEL_RESULT_OK && tunnel_config_set_e2e(bare, true) == TUNNEL_RESULT_OK &&
            tunnel_dialer_new(bare, &stranger) == TUNNEL_RESULT_OK,
        "e2e dialer without an identity");
  check_code(tunnel_dialer_dial(stranger, target, &none), TUNNEL_RESULT_E2E_REFUSED, "requires the dialer's own key",
             "the mutual listener refuses a dialer with no key");
  check(none == -1, "a refused dial leaves *out_fd alone");

  tunnel_dialer_free(stranger);
  tunnel_dialer_free(d);
  tunnel_listener_free(l);
  tunnel_config_free(lc);
  tunnel_config_free(dc);
  tunnel_config_free(bare);
  return checks_summary();
}
