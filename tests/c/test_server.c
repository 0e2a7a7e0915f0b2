/*
 * An embedded relay started and stopped 100 times leaks no file descriptors (counted in
 * /proc/self/fd), reports its address, refuses bad settings with the documented codes, and
 * serves a dial while it runs. TEST_KEY_JSON and TEST_KEY come from ffi/tests/c.rs.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"

static int count_fds(void) {
  int n = 0;
  struct dirent *e;
  DIR *dir = opendir("/proc/self/fd");
  if (dir == NULL) return -1;
  while ((e = readdir(dir)) != NULL) n += e->d_name[0] != '.';
  closedir(dir);
  return n;
}

static tunnel_server_config *settings(const char *keys) {
  tunnel_server_config *cfg = NULL;
  if (tunnel_server_config_new(&cfg) != TUNNEL_RESULT_OK || tunnel_server_config_set(cfg, "listen", "127.0.0.1:0") ||
      tunnel_server_config_set(cfg, "auth_keys", keys) ||
      tunnel_server_config_set(cfg, "allow", "[{\"host\":\"127.0.0.1\",\"port\":\"*\"}]")) {
    fprintf(stderr, "test_server: settings: %s\n", last_err());
    exit(2);
  }
  return cfg;
}

int main(void) {
  const char *keys = getenv("TEST_KEY_JSON"), *key = getenv("TEST_KEY");
  tunnel_server_config *cfg;
  tunnel_server *srv = NULL;
  char addr[64], url[80];
  int i, before, after, started = 0;
  if (keys == NULL || key == NULL) {
    fprintf(stderr, "test_server: TEST_KEY_JSON and TEST_KEY must be set\n");
    return 2;
  }
  cfg = settings(keys);

  check_code(tunnel_server_config_set(cfg, "lisen", "x"), TUNNEL_RESULT_INVALID_CONFIG, "lisen", "unknown setting");
  {
    tunnel_server_config *empty = NULL;
    tunnel_server_config_new(&empty);
    check_code(tunnel_server_start(empty, &srv), TUNNEL_RESULT_INVALID_CONFIG, "auth", "no auth keys");
    tunnel_server_config_set(empty, "auth_keys", keys);
    tunnel_server_config_set(empty, "allow", "not json");
    check_code(tunnel_server_start(empty, &srv), TUNNEL_RESULT_INVALID_CONFIG, "allow", "malformed allowlist");
    tunnel_server_config_free(empty);
    check(srv == NULL, "failed starts leave *out alone");
  }

  /* Warm up: the runtime's threads and fds exist from the first start on. */
  if (tunnel_server_start(cfg, &srv) != TUNNEL_RESULT_OK) {
    fprintf(stderr, "test_server: start: %s\n", last_err());
    return 1;
  }
  check(tunnel_server_addr(srv, addr, sizeof addr, NULL) == TUNNEL_RESULT_OK && strncmp(addr, "127.0.0.1:", 10) == 0 &&
            strcmp(addr, "127.0.0.1:0") != 0,
        "server address %s", addr);
  check(tunnel_server_url(srv, url, sizeof url, NULL) == TUNNEL_RESULT_OK && strncmp(url, "ws://127.0.0.1:", 15) == 0,
        "server url %s", url);
  check(tunnel_server_stop(srv) == TUNNEL_RESULT_OK && tunnel_server_stop(srv) == TUNNEL_RESULT_OK, "stop twice");
  tunnel_server_free(srv);

  before = count_fds();
  for (i = 0; i < 100; i++) {
    srv = NULL;
    if (tunnel_server_start(cfg, &srv) != TUNNEL_RESULT_OK) {
      fprintf(stderr, "start %d: %s\n", i, last_err());
      break;
    }
    if (tunnel_server_stop(srv) != TUNNEL_RESULT_OK) {
      fprintf(stderr, "stop %d: %s\n", i, last_err());
      tunnel_server_free(srv);
      break;
    }
    tunnel_server_free(srv);
    started++;
  }
  after = count_fds();
  check(started == 100, "started and stopped 100 times (%d)", started);
  check(before == after, "no fd leaked: %d open before, %d after", before, after);
  /* Last (its sockets close in the background, so not before counting): a dial through the
   * relay proves it serves; then freeing the running relay aborts it. */
  srv = NULL;
  check(tunnel_server_start(cfg, &srv) == TUNNEL_RESULT_OK && tunnel_server_url(srv, url, sizeof url, NULL) == TUNNEL_RESULT_OK &&
            tunnel_server_addr(srv, addr, sizeof addr, NULL) == TUNNEL_RESULT_OK,
        "start once more");
  {
    /* A dial through the embedded relay to its own endpoint proves it serves. */
    tunnel_config *c = NULL;
    tunnel_dialer *d = NULL;
    int fd = -1;
    tunnel_result r;
    tunnel_config_new(url, &c);
    tunnel_config_set_key(c, key);
    tunnel_dialer_new(c, &d);
    r = tunnel_dialer_dial(d, addr, &fd);
    check(r == TUNNEL_RESULT_OK, "dial through the embedded relay (%s)", r == TUNNEL_RESULT_OK ? "ok" : last_err());
    if (fd >= 0) close(fd);
    tunnel_dialer_free(d);
    tunnel_config_free(c);
  }
  tunnel_server_free(srv);
  tunnel_server_config_free(cfg);
  return checks_summary();
}
