/*
 * The C face against a live relay on loopback, driven by ffi/tests/c.rs, which passes:
 *   TEST_RELAY (URL), TEST_KEY (KID:BASE64), TEST_WRONG_KEY, TEST_ECHO (an echo server),
 *   TEST_SINK (answers "LEN FNVHEX\n" after our EOF), TEST_DENIED (a target outside the
 *   allowlist), TEST_DOWN (a relay URL nobody listens on), TEST_IDENTITY (a listener key path),
 *   TEST_EXIT_IDENTITY (the key of an exit listener the relay lets TEST_KEY dial via).
 * Prints TAP lines; exits non-zero if any check fails.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

static const char *env(const char *name) {
  const char *v = getenv(name);
  if (v == NULL) {
    fprintf(stderr, "test_client: %s is not set\n", name);
    exit(2);
  }
  return v;
}

static tunnel_dialer *make_dialer(const char *relay, const char *key) {
  tunnel_config *cfg = NULL;
  tunnel_dialer *d = NULL;
  if (tunnel_config_new(relay, &cfg) != TUNNEL_RESULT_OK || tunnel_config_set_key(cfg, key) != TUNNEL_RESULT_OK ||
      tunnel_config_set_timeout_ms(cfg, 10000) != TUNNEL_RESULT_OK || tunnel_dialer_new(cfg, &d) != TUNNEL_RESULT_OK) {
    fprintf(stderr, "test_client: cannot make a dialer: %s\n", last_err());
    exit(2);
  }
  tunnel_config_free(cfg);
  return d;
}

static void null_and_utf8(const char *relay, tunnel_dialer *d) {
  tunnel_config *cfg = (tunnel_config *)&checks_run; /* a sentinel that must stay untouched */
  int fd = -7;
  size_t n = 0;
  char small[8];
  tunnel_result r;

  check_code(tunnel_config_new(NULL, &cfg), TUNNEL_RESULT_NULL_PARAMETER, "relay_url", "config_new(NULL url)");
  check(cfg == (tunnel_config *)&checks_run, "a failed call leaves its out-pointer alone");
  check_code(tunnel_config_new(relay, NULL), TUNNEL_RESULT_NULL_PARAMETER, "out", "config_new(NULL out)");
  check_code(tunnel_dialer_dial(NULL, "127.0.0.1:1", &fd), TUNNEL_RESULT_NULL_PARAMETER, "dialer", "dial(NULL dialer)");
  check_code(tunnel_dialer_dial(d, NULL, &fd), TUNNEL_RESULT_NULL_PARAMETER, "target", "dial(NULL target)");
  check_code(tunnel_dialer_dial(d, "127.0.0.1:1", NULL), TUNNEL_RESULT_NULL_PARAMETER, "out_fd", "dial(NULL out_fd)");
  check(fd == -7, "a failed dial leaves *out_fd alone");
  check_code(tunnel_dialer_new(NULL, NULL), TUNNEL_RESULT_NULL_PARAMETER, "out", "dialer_new(NULL, NULL)");
  check_code(tunnel_listener_accept(NULL, 0, &fd, NULL), TUNNEL_RESULT_NULL_PARAMETER, "listener", "accept(NULL)");
  check_code(tunnel_server_config_set(NULL, "listen", "x"), TUNNEL_RESULT_NULL_PARAMETER, "cfg", "server_config_set(NULL)");

  check_code(tunnel_config_new("ws://\xff\xfe", &cfg), TUNNEL_RESULT_INVALID_UTF8, "relay_url", "config_new(bad UTF-8)");
  check_code(tunnel_dialer_dial(d, "\xc3\x28:80", &fd), TUNNEL_RESULT_INVALID_UTF8, "target", "dial(bad UTF-8)");
  check_code(tunnel_dialer_dial(d, "no-port-here", &fd), TUNNEL_RESULT_INVALID_ARGUMENT, "no-port-here", "dial(no port)");
  check_code(tunnel_config_new("ftp://x", &cfg), TUNNEL_RESULT_INVALID_ARGUMENT, "ftp", "config_new(bad scheme)");

  /* Freeing NULL is a no-op everywhere. */
  tunnel_config_free(NULL);
  tunnel_dialer_free(NULL);
  tunnel_listener_free(NULL);
  tunnel_server_config_free(NULL);
  tunnel_server_free(NULL);
  check(1, "every _free accepts NULL");

  /* The message getter is snprintf-shaped. */
  tunnel_config_new(NULL, &cfg);
  r = tunnel_last_error_message(NULL, 0, &n);
  check(r == TUNNEL_RESULT_OK && n == strlen("argument `relay_url` is NULL"), "last_error_message(NULL, 0) reports the length (%zu)", n);
  r = tunnel_last_error_message(small, sizeof small, &n);
  check(r == TUNNEL_RESULT_OK && strlen(small) == sizeof small - 1 && n > sizeof small,
        "last_error_message truncates and NUL-terminates (\"%s\" of %zu bytes)", small, n);
  check(tunnel_last_error_message(NULL, 5, &n) == TUNNEL_RESULT_NULL_PARAMETER, "last_error_message(NULL, 5) is refused");

  check(strcmp(tunnel_version(), TUNNEL_VERSION) == 0, "tunnel_version() %s matches the header", tunnel_version());
  check(strcmp(tunnel_result_name(TUNNEL_RESULT_NOT_ALLOWED), "NOT_ALLOWED") == 0 &&
            strcmp(tunnel_result_name(TUNNEL_RESULT_FORKED_CHILD), "FORKED_CHILD") == 0 &&
            strcmp(tunnel_result_name(424242), "UNKNOWN") == 0,
        "tunnel_result_name");
}

/* Send `total` bytes and read the echo at once (non-blocking, driven by poll), half-closing
 * after the last byte; the hash of what came back must equal the hash of what went out. */
static void echo_hashed(tunnel_dialer *d, const char *target, size_t total) {
  int fd = -1;
  tunnel_result r = tunnel_dialer_dial(d, target, &fd);
  unsigned char out[65536], in[65536];
  size_t sent = 0, got = 0, i;
  uint64_t h_out = FNV_INIT, h_in = FNV_INIT;
  int shut = 0, eof = 0, ok = 1;

  check(r == TUNNEL_RESULT_OK && fd >= 0, "dial %s (%s)", target, r == TUNNEL_RESULT_OK ? "ok" : last_err());
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
      for (i = 0; i < want; i++) out[i] = (unsigned char)((sent + i) * 31 + 7);
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
        "echo of %zu bytes, hashed both ways, ends in EOF after shutdown(SHUT_WR) (sent %zu, got %zu, %s)", total, sent,
        got, h_in == h_out ? "hashes equal" : "hashes differ");
  close(fd);
}

/* Write, half-close, then read the sink's verdict: the write side ended, the read side lives. */
static void half_close(tunnel_dialer *d, const char *target) {
  int fd = -1;
  unsigned char buf[65536];
  char reply[128], want[128];
  size_t total = 1 << 20, sent = 0, got = 0, i;
  uint64_t h = FNV_INIT;
  ssize_t n;

  if (tunnel_dialer_dial(d, target, &fd) != TUNNEL_RESULT_OK) {
    check(0, "dial the sink: %s", last_err());
    return;
  }
  while (sent < total) {
    for (i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i ^ (sent >> 16));
    n = write(fd, buf, sizeof buf);
    if (n <= 0) break;
    h = fnv1a(h, buf, (size_t)n);
    sent += (size_t)n;
  }
  check(shutdown(fd, SHUT_WR) == 0, "shutdown(SHUT_WR) on a tunnel fd");
  while (got < sizeof reply - 1 && (n = read(fd, reply + got, sizeof reply - 1 - got)) > 0) got += (size_t)n;
  reply[got] = '\0';
  snprintf(want, sizeof want, "%zu %016llx\n", sent, (unsigned long long)h);
  check(strcmp(reply, want) == 0, "the sink saw our EOF and answered on the open half: got \"%.*s\", want \"%.*s\"",
        (int)strcspn(reply, "\n"), reply, (int)strcspn(want, "\n"), want);
  close(fd);
}

static void poll_readiness(tunnel_dialer *d, const char *echo) {
  int fd = -1;
  struct pollfd p;
  char buf[16];
  ssize_t n;
  if (tunnel_dialer_dial(d, echo, &fd) != TUNNEL_RESULT_OK) {
    check(0, "dial echo: %s", last_err());
    return;
  }
  p.fd = fd;
  p.events = POLLIN;
  check(poll(&p, 1, 100) == 0, "poll: a quiet tunnel fd is not readable");
  check(write(fd, "ping\n", 5) == 5, "write ping");
  p.revents = 0;
  check(poll(&p, 1, 10000) == 1 && (p.revents & POLLIN), "poll: readable once the echo arrives");
  n = read(fd, buf, sizeof buf);
  check(n == 5 && memcmp(buf, "ping\n", 5) == 0, "read the echo");
  close(fd);
}

static void refusals(tunnel_dialer *d, const char *relay, const char *wrong_key, const char *echo, const char *denied,
                     const char *down) {
  int fd = -7;
  tunnel_dialer *bad = make_dialer(relay, wrong_key);
  tunnel_dialer *nowhere = make_dialer(down, env("TEST_KEY"));
  tunnel_config *cfg = NULL;
  check_code(tunnel_dialer_dial(bad, echo, &fd), TUNNEL_RESULT_AUTH_FAILED, "refused", "wrong key");
  check_code(tunnel_dialer_dial(d, denied, &fd), TUNNEL_RESULT_NOT_ALLOWED, denied, "target outside the allowlist");
  check_code(tunnel_dialer_dial(nowhere, echo, &fd), TUNNEL_RESULT_RELAY_UNAVAILABLE, down + 5, "relay down");
  check(fd == -7, "failed dials leave *out_fd alone");
  tunnel_dialer_free(bad);
  tunnel_dialer_free(nowhere);

  tunnel_config_new(relay, &cfg);
  check_code(tunnel_config_set_key(cfg, "not-a-key"), TUNNEL_RESULT_INVALID_ARGUMENT, "KID:BASE64", "malformed key");
  check_code(tunnel_config_set_timeout_ms(cfg, 0), TUNNEL_RESULT_INVALID_ARGUMENT, "timeout_ms", "zero timeout");
  check_code(tunnel_config_set_ca_file(cfg, "/nonexistent/ca.pem"), TUNNEL_RESULT_INVALID_CONFIG, "/nonexistent/ca.pem",
             "missing CA file");
  {
    tunnel_dialer *none = NULL;
    check_code(tunnel_dialer_new(cfg, &none), TUNNEL_RESULT_INVALID_ARGUMENT, "key", "dialer without a key");
    check_code(tunnel_listener_bind(cfg, (tunnel_listener **)&none), TUNNEL_RESULT_INVALID_ARGUMENT, "identity",
               "listener without an identity");
  }
  tunnel_config_free(cfg);
}

static void listener(tunnel_dialer *d, const char *relay, const char *identity) {
  tunnel_config *cfg = NULL;
  tunnel_listener *l = NULL;
  char name[80], target[96], buf[32];
  size_t n = 0;
  int lfd = -1, in = -1, out = -1;
  struct pollfd p;
  tunnel_peer peer;
  tunnel_result r;

  tunnel_config_new(relay, &cfg);
  r = tunnel_config_set_identity_file(cfg, identity, true);
  check(r == TUNNEL_RESULT_OK, "identity file created (%s)", r == TUNNEL_RESULT_OK ? identity : last_err());
  r = tunnel_listener_bind(cfg, &l);
  tunnel_config_free(cfg);
  check(r == TUNNEL_RESULT_OK, "listener_bind (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (r != TUNNEL_RESULT_OK) return;
  check(tunnel_listener_name(l, name, sizeof name, &n) == TUNNEL_RESULT_OK && n == 26 && strlen(name) == 26,
        "listener name %s", name);
  check(tunnel_listener_fd(l, &lfd) == TUNNEL_RESULT_OK && lfd >= 0, "listener fd");
  p.fd = lfd;
  p.events = POLLIN;
  check(poll(&p, 1, 0) == 0, "listener fd not readable with nothing waiting");
  check_code(tunnel_listener_accept(l, 100, &in, NULL), TUNNEL_RESULT_TIMEOUT, "100 ms", "accept times out");

  snprintf(target, sizeof target, "%s:0", name);
  r = tunnel_dialer_dial(d, target, &out);
  check(r == TUNNEL_RESULT_OK, "dial the listener by name (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  p.revents = 0;
  check(poll(&p, 1, 10000) == 1 && (p.revents & POLLIN), "listener fd readable when a stream waits");
  r = tunnel_listener_accept(l, 0, &in, &peer);
  check(r == TUNNEL_RESULT_OK && in >= 0 && peer.via == TUNNEL_VIA_DIAL && peer.client[0] != '\0',
        "accept a dialed stream from %s", r == TUNNEL_RESULT_OK ? peer.client : last_err());
  p.revents = 0;
  check(poll(&p, 1, 0) == 0, "listener fd not readable once the queue is empty");
  if (in >= 0 && out >= 0) {
    check(write(out, "hello\n", 6) == 6 && read(in, buf, sizeof buf) == 6 && memcmp(buf, "hello\n", 6) == 0,
          "bytes flow dialer -> listener");
    check(write(in, "back\n", 5) == 5 && read(out, buf, sizeof buf) == 5 && memcmp(buf, "back\n", 5) == 0,
          "bytes flow listener -> dialer");
    check(shutdown(out, SHUT_WR) == 0 && read(in, buf, sizeof buf) == 0, "half-close reaches the listener");
    check(write(in, "late\n", 5) == 5 && read(out, buf, sizeof buf) == 5, "the other half still works");
    close(in);
    close(out);
  }
  check(tunnel_listener_close(l) == TUNNEL_RESULT_OK && tunnel_listener_close(l) == TUNNEL_RESULT_OK, "close twice");
  check_code(tunnel_listener_accept(l, 1000, &in, NULL), TUNNEL_RESULT_CLOSED, "closed", "accept after close");
  p.revents = 0;
  check(poll(&p, 1, 0) == 1, "listener fd readable once closed");
  tunnel_listener_free(l);
}

/* An exit listener exposing no service (tunnel_config_set_listener_exit + _exit_only, in a pool)
 * and dials through it; a dial to its name is refused NOT_ALLOWED. */
static void exit_listener(tunnel_dialer *d, const char *relay, const char *identity, const char *echo, const char *denied) {
  tunnel_config *cfg = NULL;
  tunnel_listener *l = NULL;
  char name[80], rules[128], buf[8];
  size_t n = 0;
  int fd = -1;
  tunnel_result r;
  const char *port = strrchr(echo, ':');

  tunnel_config_new(relay, &cfg);
  check_code(tunnel_config_set_listener_exit(cfg, "[{\"host\": 1}]"), TUNNEL_RESULT_INVALID_CONFIG, "exit allow", "a malformed exit rule");
  check_code(tunnel_config_set_listener_exit(cfg, "[]"), TUNNEL_RESULT_INVALID_ARGUMENT, "at least one allow rule", "no exit rules");
  snprintf(rules, sizeof rules, "[{\"host\":\"127.0.0.1\",\"port\":%s}]", port ? port + 1 : "0");
  check(tunnel_config_set_listener_exit(cfg, rules) == TUNNEL_RESULT_OK, "exit rules %s (%s)", rules, last_err());
  check(tunnel_config_set_listener_exit_only(cfg, true) == TUNNEL_RESULT_OK, "exit only");
  check(tunnel_config_set_listener_pool(cfg, false) == TUNNEL_RESULT_OK, "pool off");
  /* The old name stays in the ABI as a deprecated wrapper. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  check(tunnel_config_set_pool(cfg, true) == TUNNEL_RESULT_OK, "pool on (deprecated name)");
#pragma GCC diagnostic pop
  check_code(tunnel_config_set_listener_backlog(cfg, 0), TUNNEL_RESULT_INVALID_ARGUMENT, "backlog", "a zero backlog");
  check(tunnel_config_set_listener_backlog(cfg, 64) == TUNNEL_RESULT_OK, "backlog 64");
  check(tunnel_config_set_listener_tcp_port(cfg, false) == TUNNEL_RESULT_OK, "no tcp port");
  check(tunnel_config_set_identity_file(cfg, identity, false) == TUNNEL_RESULT_OK, "exit identity (%s)", last_err());
  r = tunnel_listener_bind(cfg, &l);
  tunnel_config_free(cfg);
  check(r == TUNNEL_RESULT_OK, "exit listener bind (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (r != TUNNEL_RESULT_OK) return;
  tunnel_listener_name(l, name, sizeof name, &n);
  r = tunnel_dialer_dial_via(d, echo, name, &fd);
  check(r == TUNNEL_RESULT_OK, "dial via the exit (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
  if (fd >= 0) {
    check(write(fd, "exit", 4) == 4 && read(fd, buf, sizeof buf) == 4 && memcmp(buf, "exit", 4) == 0, "bytes through the exit");
    close(fd);
  }
  check_code(tunnel_dialer_dial_via(d, denied, name, &fd), TUNNEL_RESULT_NOT_ALLOWED, name, "outside the exit's rules");
  {
    char by_name[96];
    snprintf(by_name, sizeof by_name, "%s:0", name);
    check_code(tunnel_dialer_dial(d, by_name, &fd), TUNNEL_RESULT_NOT_ALLOWED, "exposes no service", "a dial to an exit-only listener's name");
  }
  check_code(tunnel_dialer_dial_via(d, echo, NULL, &fd), TUNNEL_RESULT_NULL_PARAMETER, "via", "dial_via(NULL via)");
  check_code(tunnel_dialer_dial_via(d, echo, "Not A Name", &fd), TUNNEL_RESULT_INVALID_ARGUMENT, "Not A Name", "dial_via(bad name)");
  tunnel_listener_close(l);
  tunnel_listener_free(l);
}

static void forked_child(tunnel_dialer *d, const char *echo) {
  int status = -1, fd = -1;
  pid_t pid;
  fflush(stdout);
  pid = fork();
  if (pid == 0) _exit(tunnel_dialer_dial(d, echo, &fd) == TUNNEL_RESULT_FORKED_CHILD && strstr(last_err(), "fork") ? 0 : 1);
  waitpid(pid, &status, 0);
  check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a forked child gets FORKED_CHILD, not a hang");
}

/* The log callback runs on libtunnel's threads: a blocking call from it is refused. */
static tunnel_dialer *g_dialer;
static int g_pipe[2];
static volatile int g_inner = -1, g_messages;
/* Through the SOCKS5 proxy TEST_PROXY (socks5://user:pass@host:port, with a password): a dialer
 * given it by tunnel_config_set_proxy moves 1 MiB hashed; TEST_BAD_PROXY (the same proxy, a
 * wrong password, TEST_BAD_PROXY_PASSWORD) fails AUTH_FAILED with an error that names the
 * proxy but not the password;
 * a malformed proxy URL fails at its setter without echoing it. */
static void through_proxy(const char *relay, const char *key, const char *echo) {
  const char *proxy = getenv("TEST_PROXY"), *bad_proxy = getenv("TEST_BAD_PROXY");
  tunnel_config *cfg = NULL;
  tunnel_dialer *d = NULL;
  int fd = -7;
  tunnel_result r;
  if (proxy == NULL || bad_proxy == NULL) return; /* ffi/tests/c.rs says why it did not set them */
  tunnel_config_new(relay, &cfg);
  tunnel_config_set_key(cfg, key);
  tunnel_config_set_timeout_ms(cfg, 10000);
  r = tunnel_config_set_proxy(cfg, proxy);
  check(r == TUNNEL_RESULT_OK, "set_proxy %s", r == TUNNEL_RESULT_OK ? "" : last_err());
  r = tunnel_dialer_new(cfg, &d);
  check(r == TUNNEL_RESULT_OK, "dialer through the proxy %s", r == TUNNEL_RESULT_OK ? "" : last_err());
  echo_hashed(d, echo, 1u << 20);
  tunnel_dialer_free(d);
  d = NULL;
  check(tunnel_config_set_proxy(cfg, bad_proxy) == TUNNEL_RESULT_OK, "set_proxy (wrong password)");
  check(tunnel_dialer_new(cfg, &d) == TUNNEL_RESULT_OK, "dialer through the proxy, wrong password");
  check_code(tunnel_dialer_dial(d, echo, &fd), TUNNEL_RESULT_AUTH_FAILED, "refused the credentials", "wrong proxy password");
  check(strstr(last_err(), "***@") != NULL && strstr(last_err(), env("TEST_BAD_PROXY_PASSWORD")) == NULL,
        "the error masks the password: %s", last_err());
  tunnel_dialer_free(d);
  check_code(tunnel_config_set_proxy(cfg, "gopher://bob:hunter2@127.0.0.1:1"), TUNNEL_RESULT_INVALID_ARGUMENT, "gopher",
             "malformed proxy URL");
  check(strstr(last_err(), "hunter2") == NULL, "a malformed proxy URL is not echoed");
  check(tunnel_config_set_proxy(cfg, "none") == TUNNEL_RESULT_OK, "set_proxy(\"none\")");
  tunnel_config_free(cfg);
}

static void on_log(void *userdata, tunnel_log_level level, const char *message) {
  int fd = -1;
  (void)level;
  g_messages++;
  if (userdata == (void *)&g_pipe && g_inner == -1 && strstr(message, "dialer closed")) {
    g_inner = (int)tunnel_dialer_dial(g_dialer, "127.0.0.1:1", &fd);
    if (write(g_pipe[1], "x", 1) != 1) abort();
  }
}

static void log_callback(const char *relay, const char *key, const char *echo) {
  tunnel_dialer *tmp = make_dialer(relay, key);
  int fd = -1;
  struct pollfd p;
  check(pipe(g_pipe) == 0, "pipe");
  check(tunnel_set_log_callback(on_log, &g_pipe, TUNNEL_LOG_LEVEL_DEBUG) == TUNNEL_RESULT_OK, "set_log_callback");
  if (tunnel_dialer_dial(tmp, echo, &fd) == TUNNEL_RESULT_OK) close(fd);
  tunnel_dialer_free(tmp); /* logs "dialer closed" at debug level, inside the runtime */
  p.fd = g_pipe[0];
  p.events = POLLIN;
  check(poll(&p, 1, 10000) == 1, "the log callback was called (%d messages)", g_messages);
  check(g_inner == TUNNEL_RESULT_WRONG_THREAD, "a blocking call inside the callback gets WRONG_THREAD (got %s)",
        tunnel_result_name((tunnel_result)g_inner));
  check(tunnel_set_log_callback(NULL, NULL, TUNNEL_LOG_LEVEL_OFF) == TUNNEL_RESULT_OK, "remove the log callback");
  close(g_pipe[0]);
  close(g_pipe[1]);
}

int main(void) {
  const char *relay = env("TEST_RELAY"), *key = env("TEST_KEY"), *echo = env("TEST_ECHO");
  tunnel_dialer *d = make_dialer(relay, key);
  g_dialer = d;
  null_and_utf8(relay, d);
  echo_hashed(d, echo, 4u << 20);
  echo_hashed(d, echo, 1);
  half_close(d, env("TEST_SINK"));
  poll_readiness(d, echo);
  refusals(d, relay, env("TEST_WRONG_KEY"), echo, env("TEST_DENIED"), env("TEST_DOWN"));
  listener(d, relay, env("TEST_IDENTITY"));
  exit_listener(d, relay, env("TEST_EXIT_IDENTITY"), echo, env("TEST_DENIED"));
  forked_child(d, echo);
  log_callback(relay, key, echo);
  through_proxy(relay, key, echo);
  tunnel_dialer_free(d);
  return checks_summary();
}
