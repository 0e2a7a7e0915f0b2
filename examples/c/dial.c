/*
 * dial: like `nc`, through a libtunnel relay. Copies stdin to the stream and the stream to
 * stdout; stdin's EOF half-closes the stream (shutdown(SHUT_WR)), and the program ends when the
 * other side closes.
 *
 *   TUNNEL_RELAY=ws://127.0.0.1:7835 TUNNEL_KEY=1:c2VjcmV0... ./dial db.internal:5432
 *   (TUNNEL_CA=ca.pem trusts a private CA for wss://)
 *
 * Build: cc dial.c $(pkg-config --cflags --libs tunnel) -o dial
 */
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <tunnel.h>

/* Print the failed call, its code and libtunnel's message for this thread. */
static int fail(const char *what, tunnel_result r) {
  char msg[1024];
  tunnel_last_error_message(msg, sizeof msg, NULL);
  fprintf(stderr, "dial: %s: error [%s]: %s\n", what, tunnel_result_name(r), msg);
  return 1;
}

/* Copy what is readable on `from` to `to`; returns bytes copied, 0 at EOF, -1 on error. */
static ssize_t copy_once(int from, int to) {
  char buf[65536];
  ssize_t n = read(from, buf, sizeof buf), off = 0;
  while (n > 0 && off < n) {
    ssize_t w = write(to, buf + off, (size_t)(n - off));
    if (w <= 0) return -1;
    off += w;
  }
  return n;
}

int main(int argc, char **argv) {
  const char *relay = getenv("TUNNEL_RELAY"), *key = getenv("TUNNEL_KEY"), *ca = getenv("TUNNEL_CA");
  tunnel_config *cfg = NULL;
  tunnel_dialer *dialer = NULL;
  tunnel_result r;
  int fd = -1, stdin_open = 1, status = 0;

  if (argc != 2 || relay == NULL || key == NULL) {
    fprintf(stderr, "usage: TUNNEL_RELAY=URL TUNNEL_KEY=KID:BASE64 %s HOST:PORT\n", argv[0]);
    return 2;
  }
  if ((r = tunnel_config_new(relay, &cfg)) != TUNNEL_RESULT_OK) return fail("relay URL", r);
  if ((r = tunnel_config_set_key(cfg, key)) != TUNNEL_RESULT_OK) status = fail("TUNNEL_KEY", r);
  if (!status && ca != NULL && (r = tunnel_config_set_ca_file(cfg, ca)) != TUNNEL_RESULT_OK) status = fail("TUNNEL_CA", r);
  if (!status && (r = tunnel_dialer_new(cfg, &dialer)) != TUNNEL_RESULT_OK) status = fail("dialer", r);
  tunnel_config_free(cfg); /* the dialer keeps its own copy */
  if (!status && (r = tunnel_dialer_dial(dialer, argv[1], &fd)) != TUNNEL_RESULT_OK) status = fail(argv[1], r);

  while (!status) {
    struct pollfd p[2];
    p[0].fd = fd;
    p[0].events = POLLIN;
    p[1].fd = stdin_open ? STDIN_FILENO : -1;
    p[1].events = POLLIN;
    if (poll(p, 2, -1) < 0) {
      perror("dial: poll");
      status = 1;
      break;
    }
    if (p[1].revents) {
      ssize_t n = copy_once(STDIN_FILENO, fd);
      if (n == 0) {
        stdin_open = 0;
        shutdown(fd, SHUT_WR); /* our half is done; keep reading theirs */
      } else if (n < 0) {
        perror("dial: stdin -> tunnel");
        status = 1;
      }
    }
    if (p[0].revents) {
      ssize_t n = copy_once(fd, STDOUT_FILENO);
      if (n == 0) break; /* they closed: done */
      if (n < 0) {
        perror("dial: tunnel -> stdout");
        status = 1;
      }
    }
  }
  if (fd >= 0) close(fd);
  tunnel_dialer_free(dialer);
  return status;
}
