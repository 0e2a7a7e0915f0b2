/*
 * listen_echo: a line-echo service behind NAT. Registers with the relay as a listener and
 * answers every line a client sends with the same line, one client at a time; dial it from
 * anywhere as NAME:0 through the relay. Waits for clients with poll() on the listener's
 * readiness fd (stdin's EOF ends the program), then accepts with a timeout.
 *
 *   TUNNEL_RELAY=ws://127.0.0.1:7835 ./listen_echo listener.pem
 *   (the key file is created if missing; the relay must allow it, e.g. listeners_open=true)
 *
 * Closing the listener ends its session, which resets streams still in flight, so it only
 * closes when told to (stdin's EOF), not right after a client.
 *
 * Build: cc listen_echo.c $(pkg-config --cflags --libs tunnel) -o listen_echo
 */
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tunnel.h>

static int fail(const char *what, tunnel_result r) {
  char msg[1024];
  tunnel_last_error_message(msg, sizeof msg, NULL);
  fprintf(stderr, "listen_echo: %s: error [%s]: %s\n", what, tunnel_result_name(r), msg);
  return 1;
}

/* Echo whole lines until the client half-closes, then close our side too. */
static void serve(int fd) {
  FILE *in = fdopen(fd, "r");
  char line[4096];
  size_t len;
  if (in == NULL) {
    close(fd);
    return;
  }
  while (fgets(line, sizeof line, in) != NULL) {
    len = strlen(line);
    if (write(fd, line, len) != (ssize_t)len) break;
  }
  fclose(in); /* closes fd */
}

int main(int argc, char **argv) {
  const char *relay = getenv("TUNNEL_RELAY");
  tunnel_config *cfg = NULL;
  tunnel_listener *listener = NULL;
  tunnel_result r;
  char name[128];
  int ready = -1, status = 0;

  if (argc < 2 || relay == NULL) {
    fprintf(stderr, "usage: TUNNEL_RELAY=URL %s KEY.pem\n", argv[0]);
    return 2;
  }
  if ((r = tunnel_config_new(relay, &cfg)) != TUNNEL_RESULT_OK) return fail("relay URL", r);
  if ((r = tunnel_config_set_identity_file(cfg, argv[1], true)) != TUNNEL_RESULT_OK) status = fail(argv[1], r);
  if (!status && (r = tunnel_listener_bind(cfg, &listener)) != TUNNEL_RESULT_OK) status = fail("bind", r);
  tunnel_config_free(cfg);
  if (status) return status;

  tunnel_listener_name(listener, name, sizeof name, NULL);
  tunnel_listener_fd(listener, &ready);
  printf("listening as: %s\ndial: %s:0\n", name, name);
  fflush(stdout);

  for (;;) {
    struct pollfd p[2];
    int fd = -1;
    tunnel_peer peer;
    p[0].fd = ready;
    p[0].events = POLLIN;
    p[1].fd = STDIN_FILENO;
    p[1].events = POLLIN;
    if (poll(p, 2, -1) < 0) break;
    if (p[1].revents) {
      char junk[256];
      if (read(STDIN_FILENO, junk, sizeof junk) <= 0) break; /* stdin closed: stop */
    }
    if (!(p[0].revents & POLLIN)) continue;
    r = tunnel_listener_accept(listener, 1000, &fd, &peer);
    if (r == TUNNEL_RESULT_TIMEOUT) continue;
    if (r != TUNNEL_RESULT_OK) {
      status = fail("accept", r);
      break;
    }
    fprintf(stderr, "listen_echo: client %s\n", peer.client);
    serve(fd);
  }
  tunnel_listener_close(listener);
  tunnel_listener_free(listener);
  return status;
}
