/* Tiny TAP-style checks shared by the C tests (not part of the library's API). */
#ifndef TUNNEL_TEST_CHECK_H
#define TUNNEL_TEST_CHECK_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <tunnel.h>

static int checks_run, checks_failed;
static char last_error[2048];

/* The thread's last libtunnel error message. */
static inline const char *last_err(void) {
  last_error[0] = '\0';
  tunnel_last_error_message(last_error, sizeof last_error, NULL);
  return last_error;
}

static inline void check(int ok, const char *fmt, ...) {
  va_list ap;
  checks_run++;
  if (!ok) checks_failed++;
  printf("%s %d - ", ok ? "ok" : "not ok", checks_run);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  printf("\n");
  fflush(stdout);
}

/* Check that a call failed with `want` and that the last error names `needle`. */
static inline void check_code(tunnel_result got, tunnel_result want, const char *needle, const char *what) {
  const char *msg = last_err();
  check(got == want && strstr(msg, needle) != NULL, "%s: got %s (%u), want %s; message: %s (must name \"%s\")", what,
        tunnel_result_name(got), (unsigned)got, tunnel_result_name(want), msg, needle);
}

/* 64-bit FNV-1a, streamed: start with FNV_INIT. */
#define FNV_INIT 0xcbf29ce484222325ULL
static inline uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

static inline int checks_summary(void) {
  printf("1..%d\n# %d of %d checks failed\n", checks_run, checks_failed, checks_run);
  return checks_failed == 0 ? 0 : 1;
}

#endif
