/*
 * libtunnel: reach private TCP services through a relay, over one authenticated WebSocket.
 * This file is generated from ffi/src by cbindgen; do not edit it. Regenerate it with
 *   UPDATE_HEADER=1 cargo test -p libtunnel-ffi --test header
 * No ABI stability is promised before 1.0: the library's SONAME carries MAJOR.MINOR.
 */

#ifndef TUNNEL_H
#define TUNNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TUNNEL_VERSION_MAJOR 0
#define TUNNEL_VERSION_MINOR 1
#define TUNNEL_VERSION_PATCH 0
#define TUNNEL_VERSION "0.1.0"

/**
 * The outcome of every fallible libtunnel call. `TUNNEL_RESULT_OK` is 0; every failure is at
 * least 7000, so it never looks like an errno. `tunnel_result_name` gives the SCREAMING name
 * (the core's name for 7001-7099) and `tunnel_last_error_message` says what went wrong on this
 * thread. Numbers are stable: new codes are added, retired numbers stay reserved.
 */
enum tunnel_result
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /**
   * Success; out-pointers were written.
   */
  TUNNEL_RESULT_OK = 0,
  /**
   * The relay rejected the credentials (wrong secret, replayed proof).
   */
  TUNNEL_RESULT_AUTH_FAILED = 7001,
  /**
   * The relay has no key with this key id.
   */
  TUNNEL_RESULT_AUTH_UNKNOWN_KEY = 7002,
  /**
   * Client and relay clocks differ by more than 15 minutes.
   */
  TUNNEL_RESULT_AUTH_CLOCK_SKEW = 7003,
  /**
   * The target is not in the relay's allowlist.
   */
  TUNNEL_RESULT_NOT_ALLOWED = 7004,
  /**
   * The relay could not resolve or reach the target.
   */
  TUNNEL_RESULT_UNREACHABLE = 7005,
  /**
   * The target refused the relay's connection.
   */
  TUNNEL_RESULT_REFUSED = 7006,
  /**
   * An operation did not finish in time (a dial, or an accept with a timeout).
   */
  TUNNEL_RESULT_TIMEOUT = 7007,
  /**
   * The peer broke the protocol.
   */
  TUNNEL_RESULT_PROTOCOL = 7008,
  /**
   * The relay could not be reached, or the session to it died.
   */
  TUNNEL_RESULT_RELAY_UNAVAILABLE = 7009,
  /**
   * A relay setting is missing or malformed.
   */
  TUNNEL_RESULT_INVALID_CONFIG = 7010,
  /**
   * An argument (URL, target, key, timeout) is malformed.
   */
  TUNNEL_RESULT_INVALID_ARGUMENT = 7011,
  /**
   * The dialer, listener or stream was closed.
   */
  TUNNEL_RESULT_CLOSED = 7012,
  /**
   * A local I/O error.
   */
  TUNNEL_RESULT_IO = 7013,
  /**
   * Any other failure (see the message).
   */
  TUNNEL_RESULT_GENERAL = 7014,
  /**
   * A listener name belongs to another key.
   */
  TUNNEL_RESULT_NAME_TAKEN = 7015,
  /**
   * End to end: the listener's key does not prove the name dialed (or a chosen name has no pin).
   */
  TUNNEL_RESULT_E2E_IDENTITY = 7016,
  /**
   * End to end: the listener does not admit this dialer's key, or refused a plaintext stream.
   */
  TUNNEL_RESULT_E2E_REFUSED = 7017,
  /**
   * A pointer argument was NULL; the message names it.
   */
  TUNNEL_RESULT_NULL_PARAMETER = 7101,
  /**
   * A string argument was not valid UTF-8; the message names it.
   */
  TUNNEL_RESULT_INVALID_UTF8 = 7102,
  /**
   * libtunnel panicked (a bug); the message holds the panic text. The process can go on.
   */
  TUNNEL_RESULT_PANIC = 7103,
  /**
   * A blocking call came from a libtunnel runtime thread (for example inside a log callback).
   */
  TUNNEL_RESULT_WRONG_THREAD = 7104,
  /**
   * The call came from a child forked after libtunnel started its runtime; use libtunnel
   * only in the parent, or exec first.
   */
  TUNNEL_RESULT_FORKED_CHILD = 7105,
  /**
   * The runtime (its threads) could not be started.
   */
  TUNNEL_RESULT_RUNTIME_FAILED = 7106,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum tunnel_result tunnel_result;
#else
typedef uint32_t tunnel_result;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * What happened to the session to the relay.
 */
enum tunnel_state
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /**
   * A session is up: a listener (re-)registered, or a dialer authenticated one.
   */
  TUNNEL_STATE_CONNECTED = 1,
  /**
   * The session ended; `cause` and `message` say why.
   */
  TUNNEL_STATE_DISCONNECTED = 2,
  /**
   * A listener waits `delay_ms` before its `attempt`-th try to re-register.
   */
  TUNNEL_STATE_RECONNECTING = 3,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum tunnel_state tunnel_state;
#else
typedef uint32_t tunnel_state;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * How an accepted stream reached the relay.
 */
enum tunnel_via
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /**
   * A dialer connected to the listener's name (`NAME:0`).
   */
  TUNNEL_VIA_DIAL = 1,
  /**
   * A public HTTP request routed by `Host`.
   */
  TUNNEL_VIA_HTTP = 2,
  /**
   * The listener's public TCP port.
   */
  TUNNEL_VIA_TCP = 3,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum tunnel_via tunnel_via;
#else
typedef uint32_t tunnel_via;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * Severity of a log message; the numbers grow with verbosity.
 */
enum tunnel_log_level
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
  /**
   * Nothing is logged.
   */
  TUNNEL_LOG_LEVEL_OFF = 0,
  /**
   * A bug in libtunnel.
   */
  TUNNEL_LOG_LEVEL_ERROR = 1,
  /**
   * Something went wrong that libtunnel handles (a relay dropped, a reconnect).
   */
  TUNNEL_LOG_LEVEL_WARN = 2,
  /**
   * Lifecycle events (a relay listening, a listener registered).
   */
  TUNNEL_LOG_LEVEL_INFO = 3,
  /**
   * Per-connection detail.
   */
  TUNNEL_LOG_LEVEL_DEBUG = 4,
  /**
   * Everything.
   */
  TUNNEL_LOG_LEVEL_TRACE = 5,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum tunnel_log_level tunnel_log_level;
#else
typedef uint32_t tunnel_log_level;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * A client configuration (opaque). Made by `tunnel_config_new`, ended by `tunnel_config_free`.
 * Not thread-safe while being changed; reading it from several threads at once is fine.
 */
typedef struct tunnel_config tunnel_config;

/**
 * A dialer (opaque). Made by `tunnel_dialer_new`, ended by `tunnel_dialer_free`. Thread-safe:
 * several threads may dial at once; they share one session to the relay.
 */
typedef struct tunnel_dialer tunnel_dialer;

/**
 * A reverse-tunnel listener (opaque). Made by `tunnel_listener_bind`, ended by
 * `tunnel_listener_free`. Thread-safe: accept, fd, name and close may be called from any thread.
 */
typedef struct tunnel_listener tunnel_listener;

/**
 * A running embedded relay (opaque). Made by `tunnel_server_start`, stopped by
 * `tunnel_server_stop`, ended by `tunnel_server_free`. Thread-safe.
 */
typedef struct tunnel_server tunnel_server;

/**
 * Settings for an embedded relay (opaque). Made by `tunnel_server_config_new`, ended by
 * `tunnel_server_config_free`.
 */
typedef struct tunnel_server_config tunnel_server_config;

/**
 * One connection-state event, valid only during the callback (copy what you keep).
 */
typedef struct tunnel_state_event {
  /**
   * Which event this is.
   */
  tunnel_state state;
  /**
   * `TUNNEL_STATE_DISCONNECTED`: why (`TUNNEL_RESULT_RELAY_UNAVAILABLE` when the relay went
   * away, `TUNNEL_RESULT_CLOSED` after a close, `TUNNEL_RESULT_NAME_TAKEN` ...); otherwise
   * `TUNNEL_RESULT_OK`.
   */
  tunnel_result cause;
  /**
   * `TUNNEL_STATE_CONNECTED`: the relay URL; otherwise NULL.
   */
  const char *relay;
  /**
   * `TUNNEL_STATE_CONNECTED` of a listener: the registered name; otherwise NULL.
   */
  const char *name;
  /**
   * `TUNNEL_STATE_DISCONNECTED`: the cause in words; otherwise NULL.
   */
  const char *message;
  /**
   * `TUNNEL_STATE_RECONNECTING`: which attempt comes next (from 1); otherwise 0.
   */
  uint32_t attempt;
  /**
   * `TUNNEL_STATE_RECONNECTING`: milliseconds until it; otherwise 0.
   */
  uint32_t delay_ms;
} tunnel_state_event;

/**
 * Receives one connection-state event. `userdata` is what was given with the callback;
 * `event` and its strings are valid only during the call. Called on a libtunnel runtime thread,
 * one event at a time and in order. It must not block, must not call blocking libtunnel
 * functions (they return `TUNNEL_RESULT_WRONG_THREAD`), and must not set a state callback or
 * free the dialer or listener (those wait for the call in progress).
 */
typedef void (*tunnel_state_callback)(void *userdata, const struct tunnel_state_event *event);

/**
 * Who is on the other end of an accepted stream. Filled by `tunnel_listener_accept`; plain
 * data, owned by the caller.
 */
typedef struct tunnel_peer {
  /**
   * The original client's address as the relay saw it (`ip:port`), NUL-terminated
   * (truncated if longer than 63 bytes).
   */
  char client[64];
  /**
   * How the stream arrived.
   */
  tunnel_via via;
  /**
   * The port label a dialer asked for (0 = default), or the public TCP port.
   */
  uint16_t port;
  /**
   * Whether the stream is end-to-end encrypted (the listener has e2e on).
   */
  bool e2e;
  /**
   * The dialer's verified key-derived name (e2e in mutual mode), NUL-terminated; empty
   * otherwise.
   */
  char dialer_name[32];
} tunnel_peer;

/**
 * Receives one log message. `userdata` is what was given to `tunnel_set_log_callback`;
 * `message` is NUL-terminated and valid only during the call (copy it to keep it). Called on
 * whichever thread logs (usually a `libtunnel-rt` runtime thread), possibly from several
 * threads at once. It must not block, and must not call blocking libtunnel functions (they
 * return `TUNNEL_RESULT_WRONG_THREAD`). Messages never hold secrets.
 */
typedef void (*tunnel_log_callback)(void *userdata, tunnel_log_level level, const char *message);

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The library version as a static NUL-terminated string ("0.1.0"); compare it with the
 * `TUNNEL_VERSION_*` macros of the header you compiled against. Never free it.
 */
const char *tunnel_version(void);

/**
 * Copy the message of the last failed libtunnel call on this thread into `buf`, as `snprintf`
 * does: at most `len - 1` bytes plus a NUL (nothing when `len` is 0, and then `buf` may be
 * NULL). `*out_n` (optional, may be NULL) receives the full message length without the NUL, so
 * a caller can retry with a bigger buffer. The message is empty when nothing failed yet.
 * Successful calls do not clear it. Returns `TUNNEL_RESULT_NULL_PARAMETER` only when `buf` is
 * NULL and `len` is not 0.
 *
 * # Safety
 * `buf` must point to `len` writable bytes; `out_n` must be NULL or writable.
 */
tunnel_result tunnel_last_error_message(char *buf, size_t len, size_t *out_n);

/**
 * Start a config for the relay at `relay_url` (`ws://`, `wss://` or `tcp://`).
 * (`tunnel_config_new_env` takes the URL from `TUNNEL_RELAY` instead.)
 *
 * On success `*out` receives a new config owned by the caller; end it with `tunnel_config_free`.
 * Fails with `TUNNEL_RESULT_INVALID_ARGUMENT` for a malformed URL.
 *
 * # Safety
 * `relay_url` must be NULL or a NUL-terminated string; `out` must be NULL or writable.
 */
tunnel_result tunnel_config_new(const char *relay_url, struct tunnel_config **out);

/**
 * Start a config whose relay URL comes from `TUNNEL_RELAY` (the environment, then `./.env`),
 * read when the dialer or listener is made, like every value no setter gives.
 *
 * On success `*out` receives a new config owned by the caller; end it with `tunnel_config_free`.
 *
 * # Safety
 * `out` must be NULL or writable.
 */
tunnel_result tunnel_config_new_env(struct tunnel_config **out);

/**
 * Set the shared key a dialer authenticates with, written `KID:BASE64` (what `tunnel keygen`
 * prints as `TUNNEL_KEY`) or the path of a file holding it. Copied; the caller keeps `key`.
 * Default: `TUNNEL_KEY`.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `key` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_set_key(struct tunnel_config *cfg, const char *key);

/**
 * Trust only the PEM certificates in the file at `path` for `wss://`, `grpcs://` and `quic://`
 * relays (a private CA or a self-signed relay certificate). The file is read now. Default:
 * `TUNNEL_CA`, else the public Web PKI.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `path` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_set_ca_file(struct tunnel_config *cfg, const char *path);

/**
 * Reach the relay through the upstream proxy at `proxy_url`: `http://user:pass@host:port` (HTTP
 * CONNECT with Basic credentials), `https://...` (TLS to the proxy, trusting the config's CA
 * file, else the public Web PKI), `socks5://user:pass@host:port` (SOCKS5, the relay's name
 * resolved by the proxy), or `none` for a direct connection whatever the environment says.
 * Default: `TUNNEL_PROXY`, else `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` with `NO_PROXY`, as
 * curl reads them. A malformed URL is `TUNNEL_RESULT_INVALID_ARGUMENT`; the password never
 * appears in an error message or a log line.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `proxy_url` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_set_proxy(struct tunnel_config *cfg, const char *proxy_url);

/**
 * Set how long one dial (or a listener's registration) may take, in milliseconds (default
 * `TUNNEL_TIMEOUT` seconds, else 20000). 0 and more than 30 days are
 * `TUNNEL_RESULT_INVALID_ARGUMENT`.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_timeout_ms(struct tunnel_config *cfg, uint64_t timeout_ms);

/**
 * Set a listener's Ed25519 identity from a PKCS#8 PEM file (`tunnel keygen --listener --out
 * FILE` makes one). When the file does not exist and `create` is true, a new identity is
 * generated and written there (mode 0600) first. The file is read now.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `path` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_set_identity_file(struct tunnel_config *cfg,
                                              const char *path,
                                              bool create);

/**
 * Register a listener under `name` instead of the identity's derived name (the relay must
 * grant it to the key in `listener_keys`). Checked when the listener binds.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `name` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_set_listener_name(struct tunnel_config *cfg, const char *name);

/**
 * Say that a listener's local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server):
 * the relay forwards public HTTP/1.1 and HTTP/2 requests to it as HTTP/2 (`tunnel listen
 * --h2c`). Default false (HTTP/1.1).
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_listener_h2c(struct tunnel_config *cfg, bool h2c);

/**
 * Have the relay's public HTTPS port pass connections whose SNI names this listener through
 * undecrypted; the local service terminates TLS itself (`tunnel listen --tls-passthrough`).
 * Default false.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_listener_tls_passthrough(struct tunnel_config *cfg, bool on);

/**
 * Make dialers speak Emissary's classic protocol (one connection per stream, no half-close)
 * when `classic` is true, libtunnel's multiplexed one when false. Default: `TUNNEL_MODE`, else
 * multiplexed.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_classic(struct tunnel_config *cfg, bool classic);

/**
 * Turn end-to-end encryption on or off (default off). A dialer then runs TLS 1.3 inside every
 * stream to a listener name and checks the listener's key against the name (or its pin); other
 * targets fail with `TUNNEL_RESULT_INVALID_ARGUMENT`. In mutual mode it presents the config's
 * identity (`tunnel_config_set_identity_file`). A listener terminates the TLS on every stream
 * (its service reads plaintext) and refuses plaintext streams.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_e2e(struct tunnel_config *cfg, bool on);

/**
 * Dialer, e2e: pin a chosen (relay-granted) listener name to its key, written `NAME=KEY` (KEY:
 * base64 public key or key-derived name). Without a pin a chosen name cannot be dialed end to
 * end (`TUNNEL_RESULT_E2E_IDENTITY`). Checked now; may be called several times.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `pin` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_add_e2e_pin(struct tunnel_config *cfg, const char *pin);

/**
 * Listener, e2e: require dialers' own keys and admit this one (base64 public key or key-derived
 * name); others fail with `TUNNEL_RESULT_E2E_REFUSED` at their end. Checked now; may be called
 * several times. Binding fails with `TUNNEL_RESULT_INVALID_ARGUMENT` unless e2e is on
 * (`tunnel_config_set_e2e`).
 *
 * # Safety
 * `cfg` must be NULL or a live config; `key` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_add_listener_allow_peer(struct tunnel_config *cfg, const char *key);

/**
 * Make a listener bound from this config join its name's pool of replicas (`tunnel listen
 * --pool`): every replica opts in (same key, or keys the relay grants the name), and the relay
 * spreads streams over them. Off by default (a second registration then gets today's rules).
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_listener_pool(struct tunnel_config *cfg, bool pool);

/**
 * Make a listener bound from this config an exit listener (`tunnel listen --exit --allow`):
 * dialers the relay permits reach the targets `allow_json` admits (a JSON list of
 * `{"host", "port"}` rules, the relay's `allow` syntax) with `tunnel_dialer_dial_via`. The
 * rules are checked now (`TUNNEL_RESULT_INVALID_CONFIG` names the bad rule).
 *
 * # Safety
 * `cfg` must be NULL or a live config; `allow_json` NULL or NUL-terminated.
 */
tunnel_result tunnel_config_set_listener_exit(struct tunnel_config *cfg, const char *allow_json);

/**
 * With `tunnel_config_set_listener_exit`: this exit listener exposes no service of its own (it
 * never calls `tunnel_listener_accept`), so a stream dialed to its name is refused before it is
 * accepted and the dialer gets `TUNNEL_RESULT_NOT_ALLOWED` naming why (`tunnel listen --exit`
 * without `--to`). Default false. Binding fails with `TUNNEL_RESULT_INVALID_ARGUMENT` without
 * exit rules.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_listener_exit_only(struct tunnel_config *cfg, bool on);

/**
 * Ask the relay for a public TCP port from its `tcp_ports` range for a listener bound from this
 * config (`tunnel listen --tcp-port`). Default false.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_listener_tcp_port(struct tunnel_config *cfg, bool on);

/**
 * Set how many accepted streams may wait for `tunnel_listener_accept` (beyond the listener's
 * own small queue of ready sockets) before the relay refuses more (default 128, the core's
 * `DEFAULT_BACKLOG`; `tunnel listen --backlog`). 0 is `TUNNEL_RESULT_INVALID_ARGUMENT`.
 *
 * # Safety
 * `cfg` must be NULL or a live config.
 */
tunnel_result tunnel_config_set_listener_backlog(struct tunnel_config *cfg, size_t backlog);

/**
 * Deprecated name of `tunnel_config_add_listener_allow_peer` (kept so the ABI stays; removed in
 * a later release).
 *
 * # Safety
 * As `tunnel_config_add_listener_allow_peer`.
 */
__attribute__((deprecated("use tunnel_config_add_listener_allow_peer")))
tunnel_result tunnel_config_add_allow_peer(struct tunnel_config *cfg,
                                           const char *key);

/**
 * Deprecated name of `tunnel_config_set_listener_pool` (kept so the ABI stays; removed in a
 * later release).
 *
 * # Safety
 * As `tunnel_config_set_listener_pool`.
 */
__attribute__((deprecated("use tunnel_config_set_listener_pool")))
tunnel_result tunnel_config_set_pool(struct tunnel_config *cfg,
                                     bool pool);

/**
 * Deprecated name of `tunnel_config_set_listener_exit` (kept so the ABI stays; removed in a
 * later release).
 *
 * # Safety
 * As `tunnel_config_set_listener_exit`.
 */
__attribute__((deprecated("use tunnel_config_set_listener_exit")))
tunnel_result tunnel_config_set_exit(struct tunnel_config *cfg,
                                     const char *allow_json);

/**
 * Free a config made by `tunnel_config_new`. NULL is a no-op. Dialers and listeners made from
 * it are unaffected.
 *
 * # Safety
 * `cfg` must be NULL or a live config, not used again afterwards.
 */
void tunnel_config_free(struct tunnel_config *cfg);

/**
 * Make a dialer from `cfg` (relay URL and key required; TLS roots and timeout optional). No
 * network I/O happens until the first dial. `cfg` is copied and may be freed afterwards.
 *
 * On success `*out` receives a dialer owned by the caller; end it with `tunnel_dialer_free`.
 * Fails with `TUNNEL_RESULT_INVALID_ARGUMENT` when no key is set.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `out` NULL or writable.
 */
tunnel_result tunnel_dialer_new(const struct tunnel_config *cfg, struct tunnel_dialer **out);

/**
 * Open a stream to `target` (`host:port`, or `NAME:0` for a listener) through the relay and
 * block until it is connected or fails (bounded by the config's timeout).
 *
 * On success `*out_fd` receives a connected, blocking stream socket owned by the caller: use
 * `read`, `write`, `poll`, `shutdown(fd, SHUT_WR)` for half-close, and end it with `close`.
 * The relay's refusal comes back as its code: `TUNNEL_RESULT_NOT_ALLOWED`,
 * `TUNNEL_RESULT_AUTH_FAILED`, `TUNNEL_RESULT_REFUSED`, `TUNNEL_RESULT_RELAY_UNAVAILABLE`, ...
 * Must not be called from a libtunnel callback (`TUNNEL_RESULT_WRONG_THREAD`).
 *
 * # Safety
 * `dialer` must be NULL or a live dialer; `target` NULL or NUL-terminated; `out_fd` NULL or
 * writable.
 */
tunnel_result tunnel_dialer_dial(const struct tunnel_dialer *dialer,
                                 const char *target,
                                 int *out_fd);

/**
 * Like `tunnel_dialer_dial`, but through the exit listener `via` (a listener registered with
 * `tunnel_config_set_listener_exit`): the relay routes the stream to it and it connects `target` inside
 * its own network, checked against its own allowlist. Refusals keep their codes:
 * `TUNNEL_RESULT_NOT_ALLOWED` (outside the exit's rules, or the relay does not let this key use
 * that exit), `TUNNEL_RESULT_UNREACHABLE` (the exit is offline), ...
 *
 * # Safety
 * `dialer` must be NULL or a live dialer; `target` and `via` NULL or NUL-terminated; `out_fd`
 * NULL or writable.
 */
tunnel_result tunnel_dialer_dial_via(const struct tunnel_dialer *dialer,
                                     const char *target,
                                     const char *via,
                                     int *out_fd);

/**
 * Call `callback` with `userdata` on every change of the dialer's session to the relay from now
 * on (see `tunnel_state_callback` for the thread rules): `TUNNEL_STATE_CONNECTED` when a session
 * is authenticated (a dialer reconnects on its next dial after a loss, not in the background),
 * `TUNNEL_STATE_DISCONNECTED` when it drops. Replaces the previous callback; NULL removes it.
 * After this returns the previous callback is not running and is not called again;
 * `tunnel_dialer_free` removes it the same way. Fails with `TUNNEL_RESULT_WRONG_THREAD` when
 * called from a libtunnel callback.
 *
 * # Safety
 * `dialer` must be NULL or live; `callback` NULL or a function that stays callable, with
 * `userdata`, until it is replaced or the dialer freed.
 */
tunnel_result tunnel_dialer_set_state_callback(const struct tunnel_dialer *dialer,
                                               tunnel_state_callback callback,
                                               void *userdata);

/**
 * Free the dialer. NULL is a no-op. It does not wait: streams dialed from it keep working until
 * they finish (both sides closed) or `crate::DRAIN` (10 s) passes, then the runtime closes the
 * session to the relay; a stream still open then reads `ECONNRESET`.
 *
 * # Safety
 * `dialer` must be NULL or a live dialer, not used again afterwards.
 */
void tunnel_dialer_free(struct tunnel_dialer *dialer);

/**
 * The SCREAMING name of a result code without its prefix ("OK", "NOT_ALLOWED",
 * "NULL_PARAMETER"; "UNKNOWN" for a number this library does not know). The string is static:
 * never free it.
 */
const char *tunnel_result_name(uint32_t result);

/**
 * Connect to the relay in `cfg` and register (blocks until registered, bounded by the
 * config's timeout). Needs an identity (`tunnel_config_set_identity_file`); the name is the
 * identity's derived one unless `tunnel_config_set_listener_name` chose another. After a
 * successful bind, lost sessions are re-established in the background.
 *
 * On success `*out` receives a listener owned by the caller; end it with
 * `tunnel_listener_free` (which also closes it). `cfg` may be freed afterwards.
 *
 * # Safety
 * `cfg` must be NULL or a live config; `out` NULL or writable.
 */
tunnel_result tunnel_listener_bind(const struct tunnel_config *cfg, struct tunnel_listener **out);

/**
 * Copy the registered name (dial it as `NAME:0`) into `buf`, snprintf-style: at most
 * `len - 1` bytes plus a NUL; `*out_n` (may be NULL) gets the full length.
 *
 * # Safety
 * `listener` must be NULL or live; `buf` must have `len` writable bytes; `out_n` NULL or writable.
 */
tunnel_result tunnel_listener_name(const struct tunnel_listener *listener,
                                   char *buf,
                                   size_t len,
                                   size_t *out_n);

/**
 * Wait up to `timeout_ms` milliseconds (-1: forever, 0: don't wait) for the next stream.
 *
 * On success `*out_fd` receives a connected, blocking stream socket owned by the caller (end it
 * with `close`), and `*out_peer` (may be NULL) who sent it. `TUNNEL_RESULT_TIMEOUT` when nothing
 * arrived in time; `TUNNEL_RESULT_CLOSED` once the listener is closed.
 *
 * # Safety
 * `listener` must be NULL or live; `out_fd` NULL or writable; `out_peer` NULL or writable.
 */
tunnel_result tunnel_listener_accept(const struct tunnel_listener *listener,
                                     int timeout_ms,
                                     int *out_fd,
                                     struct tunnel_peer *out_peer);

/**
 * Give the listener's readiness fd: it polls readable (`POLLIN`) while a stream waits for
 * `tunnel_listener_accept`, or once the listener is closed. The fd belongs to the listener:
 * do not read, write or close it; it stays valid until `tunnel_listener_free`.
 *
 * # Safety
 * `listener` must be NULL or live; `out_fd` NULL or writable.
 */
tunnel_result tunnel_listener_fd(const struct tunnel_listener *listener, int *out_fd);

/**
 * Stop accepting and unregister: waiting and later `tunnel_listener_accept` calls fail with
 * `TUNNEL_RESULT_CLOSED`, streams not yet accepted are dropped, and the readiness fd turns
 * readable. It does not wait: streams accepted earlier keep working until they finish (both
 * sides closed; bytes written are delivered) or 10 s pass, then the session to the relay is
 * closed in the background and a stream still open reads `ECONNRESET`. Idempotent; the
 * listener still needs `tunnel_listener_free`.
 *
 * # Safety
 * `listener` must be NULL or live.
 */
tunnel_result tunnel_listener_close(const struct tunnel_listener *listener);

/**
 * Call `callback` with `userdata` on every change of the listener's session to the relay from
 * now on (see `tunnel_state_callback` for the thread rules): `TUNNEL_STATE_DISCONNECTED` when
 * it drops, `TUNNEL_STATE_RECONNECTING` before each retry, `TUNNEL_STATE_CONNECTED` once
 * registered again. Replaces the previous callback; NULL removes it. After this returns the
 * previous callback is not running and is not called again; `tunnel_listener_free` removes it
 * the same way. Fails with `TUNNEL_RESULT_WRONG_THREAD` when called from a libtunnel callback.
 *
 * # Safety
 * `listener` must be NULL or live; `callback` NULL or a function that stays callable, with
 * `userdata`, until it is replaced or the listener freed.
 */
tunnel_result tunnel_listener_set_state_callback(const struct tunnel_listener *listener,
                                                 tunnel_state_callback callback,
                                                 void *userdata);

/**
 * Close the listener (as `tunnel_listener_close`) and free it, closing its readiness fd. NULL
 * is a no-op.
 *
 * # Safety
 * `listener` must be NULL or live, not used again afterwards (no accept may be running on it).
 */
void tunnel_listener_free(struct tunnel_listener *listener);

/**
 * Send libtunnel's log messages up to `max_level` to `callback` with `userdata` (see
 * `tunnel_log_callback` for the thread rules). A NULL `callback` or `TUNNEL_LOG_LEVEL_OFF`
 * stops logging. The previous callback may still be running on another thread when this
 * returns. Fails with `TUNNEL_RESULT_GENERAL` if the process already has another global
 * `tracing` subscriber (a Rust host program), which then keeps receiving the events.
 *
 * # Safety
 * `callback` must be NULL or a function that stays callable, with `userdata`, until it is
 * replaced.
 */
tunnel_result tunnel_set_log_callback(tunnel_log_callback callback,
                                      void *userdata,
                                      uint32_t max_level);

/**
 * Start an empty relay configuration. `listen` defaults to `127.0.0.1:7835`; `auth_keys` and
 * `allow` are required by `tunnel_server_start`.
 *
 * On success `*out` receives a config owned by the caller; end it with
 * `tunnel_server_config_free`.
 *
 * # Safety
 * `out` must be NULL or writable.
 */
tunnel_result tunnel_server_config_new(struct tunnel_server_config **out);

/**
 * Set one relay setting by its CLI/TOML name, for example `("listen", "127.0.0.1:0")`,
 * `("auth_keys", "[{\"kid\":1,\"data\":\"...\"}]")`, `("allow", "[{\"host\":\"db\",\"port\":5432}]")`.
 * An unknown name is `TUNNEL_RESULT_INVALID_CONFIG` at once; values are checked by
 * `tunnel_server_start`. Both strings are copied.
 *
 * # Safety
 * `cfg` must be NULL or live; `name` and `value` NULL or NUL-terminated.
 */
tunnel_result tunnel_server_config_set(struct tunnel_server_config *cfg,
                                       const char *name,
                                       const char *value);

/**
 * Free a relay configuration. NULL is a no-op. Relays started from it are unaffected.
 *
 * # Safety
 * `cfg` must be NULL or live, not used again afterwards.
 */
void tunnel_server_config_free(struct tunnel_server_config *cfg);

/**
 * Check the settings, bind every endpoint and start serving in the background (on libtunnel's
 * runtime threads). `TUNNEL_RESULT_INVALID_CONFIG` names a missing or malformed setting;
 * `TUNNEL_RESULT_IO` an address that cannot be bound.
 *
 * On success `*out` receives a running relay owned by the caller; stop it with
 * `tunnel_server_stop` and end it with `tunnel_server_free`. `cfg` may be freed afterwards.
 *
 * # Safety
 * `cfg` must be NULL or live; `out` NULL or writable.
 */
tunnel_result tunnel_server_start(const struct tunnel_server_config *cfg,
                                  struct tunnel_server **out);

/**
 * Copy the relay's tunnel endpoint address (`127.0.0.1:40123`, the real port when `listen`
 * used port 0) into `buf`, snprintf-style; `*out_n` (may be NULL) gets the full length.
 *
 * # Safety
 * `server` must be NULL or live; `buf` must have `len` writable bytes; `out_n` NULL or writable.
 */
tunnel_result tunnel_server_addr(const struct tunnel_server *server,
                                 char *buf,
                                 size_t len,
                                 size_t *out_n);

/**
 * Copy the URL dialers and listeners use for this relay (`ws://127.0.0.1:40123`) into `buf`,
 * snprintf-style; `*out_n` (may be NULL) gets the full length.
 *
 * # Safety
 * `server` must be NULL or live; `buf` must have `len` writable bytes; `out_n` NULL or writable.
 */
tunnel_result tunnel_server_url(const struct tunnel_server *server,
                                char *buf,
                                size_t len,
                                size_t *out_n);

/**
 * Stop the relay gracefully: stop accepting, give open streams the `drain_timeout` setting to
 * finish, and return once every socket of the relay is closed. Idempotent: stopping a stopped
 * relay is `TUNNEL_RESULT_OK`. The relay still needs `tunnel_server_free`.
 *
 * # Safety
 * `server` must be NULL or live.
 */
tunnel_result tunnel_server_stop(const struct tunnel_server *server);

/**
 * Free a relay. NULL is a no-op. A relay that was not stopped is aborted: every connection is
 * dropped at once, without draining.
 *
 * # Safety
 * `server` must be NULL or live, not used again afterwards.
 */
void tunnel_server_free(struct tunnel_server *server);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* TUNNEL_H */
