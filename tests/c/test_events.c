/*
 * Connection-state callbacks: an embedded relay freed under a listener and a dialer (an abort:
 * every connection dropped) makes both report TUNNEL_STATE_DISCONNECTED with
 * TUNNEL_RESULT_RELAY_UNAVAILABLE; a relay started again on the same port makes the listener
 * report TUNNEL_STATE_CONNECTED with its name, and the dialer too on its next dial, whose bytes
 * come back from the echo server unchanged. TEST_KEY_JSON, TEST_KEY, TEST_IDENTITY and
 * TEST_ECHO come from ffi/tests/c.rs. Every wait is bounded (10 s).
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define MAX_EVENTS 64

/* Events as the callback saw them (its strings are copied: they live only during the call). */
struct recorder {
  pthread_mutex_t lock;
  pthread_cond_t changed;
  int n;
  tunnel_state state[MAX_EVENTS];
  tunnel_result cause[MAX_EVENTS];
  char text[MAX_EVENTS][160]; /* the name (connected) or the message (disconnected) */
};

static void on_state(void *userdata, const tunnel_state_event *ev) {
  struct recorder *r = userdata;
  const char *t = ev->state == TUNNEL_STATE_CONNECTED ? ev->name : ev->message;
  pthread_mutex_lock(&r->lock);
  if (r->n < MAX_EVENTS) {
    r->state[r->n] = ev->state;
    r->cause[r->n] = ev->cause;
    snprintf(r->text[r->n], sizeof r->text[r->n], "%s", t != NULL ? t : "");
    r->n++;
  }
  pthread_cond_broadcast(&r->changed);
  pthread_mutex_unlock(&r->lock);
}

/* The index of the first event in `state` at or after *from (then *from moves past it), waiting
 * up to 10 s; -1 if none came. */
static int wait_state(struct recorder *r, int *from, tunnel_state state) {
  struct timespec deadline;
  int i, found = -1, timed_out = 0;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += 10;
  pthread_mutex_lock(&r->lock);
  while (found < 0) {
    for (i = *from; i < r->n && found < 0; i++)
      if (r->state[i] == state) found = i;
    if (found >= 0 || timed_out) break;
    timed_out = pthread_cond_timedwait(&r->changed, &r->lock, &deadline) != 0;
  }
  pthread_mutex_unlock(&r->lock);
  if (found >= 0) *from = found + 1;
  return found;
}

static tunnel_server *start_relay(const char *keys, const char *listen) {
  tunnel_server_config *cfg = NULL;
  tunnel_server *srv = NULL;
  if (tunnel_server_config_new(&cfg) != TUNNEL_RESULT_OK || tunnel_server_config_set(cfg, "listen", listen) ||
      tunnel_server_config_set(cfg, "auth_keys", keys) || tunnel_server_config_set(cfg, "listeners_open", "true") ||
      tunnel_server_config_set(cfg, "allow", "[{\"host\":\"127.0.0.1\",\"port\":\"*\"}]") || tunnel_server_start(cfg, &srv)) {
    fprintf(stderr, "test_events: relay on %s: %s\n", listen, last_err());
    exit(2);
  }
  tunnel_server_config_free(cfg);
  return srv;
}

/* Dial `target` (an echo server), send 64 KiB, half-close, and check what comes back by hash. */
static int echo_ok(tunnel_dialer *d, const char *target) {
  static unsigned char out[65536], in[8192];
  uint64_t sent = FNV_INIT, got = FNV_INIT;
  size_t i, total = 0;
  ssize_t n;
  int fd = -1;
  if (tunnel_dialer_dial(d, target, &fd) != TUNNEL_RESULT_OK) {
    fprintf(stderr, "test_events: dial %s: %s\n", target, last_err());
    return 0;
  }
  for (i = 0; i < sizeof out; i++) out[i] = (unsigned char)(i * 31 + 7);
  sent = fnv1a(sent, out, sizeof out);
  for (i = 0; i < sizeof out; i += (size_t)n) {
    n = write(fd, out + i, sizeof out - i);
    if (n <= 0) break;
  }
  shutdown(fd, SHUT_WR);
  while ((n = read(fd, in, sizeof in)) > 0) {
    got = fnv1a(got, in, (size_t)n);
    total += (size_t)n;
  }
  close(fd);
  return total == sizeof out && got == sent;
}

int main(void) {
  const char *keys = getenv("TEST_KEY_JSON"), *key = getenv("TEST_KEY"), *identity = getenv("TEST_IDENTITY"),
             *echo = getenv("TEST_ECHO");
  static struct recorder lrec = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, {0}, {0}, {{0}}};
  static struct recorder drec = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, {0}, {0}, {{0}}};
  char addr[64], url[96], name[80];
  int lpos = 0, dpos = 0, i;
  tunnel_server *srv;
  tunnel_config *cfg = NULL;
  tunnel_listener *l = NULL;
  tunnel_dialer *d = NULL;
  if (keys == NULL || key == NULL || identity == NULL || echo == NULL) {
    fprintf(stderr, "test_events: TEST_KEY_JSON, TEST_KEY, TEST_IDENTITY and TEST_ECHO must be set\n");
    return 2;
  }
  srv = start_relay(keys, "127.0.0.1:0");
  tunnel_server_addr(srv, addr, sizeof addr, NULL);
  tunnel_server_url(srv, url, sizeof url, NULL);

  if (tunnel_config_new(url, &cfg) || tunnel_config_set_key(cfg, key) || tunnel_config_set_identity_file(cfg, identity, false) ||
      tunnel_config_set_timeout_ms(cfg, 10000) || tunnel_listener_bind(cfg, &l) || tunnel_dialer_new(cfg, &d)) {
    fprintf(stderr, "test_events: listener or dialer: %s\n", last_err());
    return 2;
  }
  tunnel_config_free(cfg);
  tunnel_listener_name(l, name, sizeof name, NULL);

  check_code(tunnel_listener_set_state_callback(NULL, on_state, &lrec), TUNNEL_RESULT_NULL_PARAMETER, "listener",
             "set_state_callback(NULL listener)");
  check(tunnel_listener_set_state_callback(l, on_state, &lrec) == TUNNEL_RESULT_OK, "listener state callback set");
  check(tunnel_dialer_set_state_callback(d, on_state, &drec) == TUNNEL_RESULT_OK, "dialer state callback set");
  check(echo_ok(d, echo), "a dial's bytes come back unchanged");
  i = wait_state(&drec, &dpos, TUNNEL_STATE_CONNECTED);
  check(i >= 0 && drec.cause[i] == TUNNEL_RESULT_OK, "the dialer reports its session connected");

  tunnel_server_free(srv); /* not stopped: an abort, every connection dropped */
  i = wait_state(&lrec, &lpos, TUNNEL_STATE_DISCONNECTED);
  check(i >= 0 && lrec.cause[i] == TUNNEL_RESULT_RELAY_UNAVAILABLE && lrec.text[i][0] != '\0',
        "the listener reports disconnected, RELAY_UNAVAILABLE: %s (%s)", i >= 0 ? tunnel_result_name(lrec.cause[i]) : "none",
        i >= 0 ? lrec.text[i] : "");
  i = wait_state(&drec, &dpos, TUNNEL_STATE_DISCONNECTED);
  check(i >= 0 && drec.cause[i] == TUNNEL_RESULT_RELAY_UNAVAILABLE, "the dialer reports disconnected, RELAY_UNAVAILABLE: %s",
        i >= 0 ? tunnel_result_name(drec.cause[i]) : "none");
  check(wait_state(&lrec, &lpos, TUNNEL_STATE_RECONNECTING) >= 0, "the listener reports its retries");

  srv = start_relay(keys, addr); /* the same port */
  i = wait_state(&lrec, &lpos, TUNNEL_STATE_CONNECTED);
  check(i >= 0 && strcmp(lrec.text[i], name) == 0, "the listener reports connected again as %s (got %s)", name,
        i >= 0 ? lrec.text[i] : "none");
  check(echo_ok(d, echo), "a dial after the restart carries bytes");
  i = wait_state(&drec, &dpos, TUNNEL_STATE_CONNECTED);
  check(i >= 0, "the dialer reports connected again");

  check(tunnel_dialer_set_state_callback(d, NULL, NULL) == TUNNEL_RESULT_OK, "a NULL callback clears it");
  tunnel_listener_free(l);
  tunnel_dialer_free(d);
  tunnel_server_free(srv);
  printf("1..%d\n", checks_run);
  return checks_failed == 0 ? 0 : 1;
}
