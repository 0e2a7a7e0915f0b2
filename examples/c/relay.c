/*
 * relay: a libtunnel relay embedded in a C program. Settings are NAME=VALUE arguments using the
 * names of `tunnel server --set` (listen, auth_keys, allow, listeners_open, ...). Prints the URL
 * dialers use, serves until stdin is closed, then stops gracefully.
 *
 *   ./relay listen=127.0.0.1:7835 'auth_keys=[{"kid":1,"data":"c2VjcmV0..."}]' \
 *           'allow=[{"host":"127.0.0.1","port":"*"}]' listeners_open=true
 *
 * Build: cc relay.c $(pkg-config --cflags --libs tunnel) -o relay
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tunnel.h>

static int fail(const char *what, tunnel_result r) {
  char msg[1024];
  tunnel_last_error_message(msg, sizeof msg, NULL);
  fprintf(stderr, "relay: %s: error [%s]: %s\n", what, tunnel_result_name(r), msg);
  return 1;
}

/* Forward libtunnel's log lines to stderr (called on libtunnel's threads; must not block long). */
static void log_line(void *userdata, tunnel_log_level level, const char *message) {
  static const char *names[] = {"off", "error", "warn", "info", "debug", "trace"};
  (void)userdata;
  fprintf(stderr, "relay [%s] %s\n", level <= TUNNEL_LOG_LEVEL_TRACE ? names[level] : "?", message);
}

int main(int argc, char **argv) {
  tunnel_server_config *cfg = NULL;
  tunnel_server *server = NULL;
  tunnel_result r;
  char url[256], buf[256];
  int i, status = 0;

  tunnel_set_log_callback(log_line, NULL, TUNNEL_LOG_LEVEL_INFO);
  if ((r = tunnel_server_config_new(&cfg)) != TUNNEL_RESULT_OK) return fail("config", r);
  for (i = 1; i < argc && !status; i++) {
    char *eq = strchr(argv[i], '=');
    if (eq == NULL) {
      fprintf(stderr, "relay: expected NAME=VALUE, got %s\n", argv[i]);
      status = 2;
      break;
    }
    *eq = '\0';
    if ((r = tunnel_server_config_set(cfg, argv[i], eq + 1)) != TUNNEL_RESULT_OK) status = fail(argv[i], r);
  }
  if (!status && (r = tunnel_server_start(cfg, &server)) != TUNNEL_RESULT_OK) status = fail("start", r);
  tunnel_server_config_free(cfg);
  if (status) return status;

  tunnel_server_url(server, url, sizeof url, NULL);
  printf("relay listening: %s\n", url);
  fflush(stdout);
  while (read(STDIN_FILENO, buf, sizeof buf) > 0) {
  }
  if ((r = tunnel_server_stop(server)) != TUNNEL_RESULT_OK) status = fail("stop", r);
  tunnel_server_free(server);
  tunnel_set_log_callback(NULL, NULL, TUNNEL_LOG_LEVEL_OFF);
  return status;
}
