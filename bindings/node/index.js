'use strict'
// libtunnel for Node: the hand-written idiomatic layer over the generated native layer
// (native.js / native.d.ts, napi-rs). Streams arrive from the native layer as socket fds and are
// wrapped here in real `net.Socket`s; everything else is Promises, EventEmitters and `Error`s
// whose `code` comes from the core's stable table (`ENOTALLOWED`, `EAUTH`, ...).
//
// Event-loop liveness: an open Listener always has one native accept() pending, which keeps the
// process alive until `listener.close()`. A Server or a Forward holds a ref'd timer handle while
// open (`unref()` releases it, as with net.Server). An idle Dialer holds nothing.

const { EventEmitter } = require('node:events')
const net = require('node:net')
const native = require('./native.js')

/** Error codes: `{ number, name, code, final }` rows of the core's table, in numeric order. */
const errorCodes = native.errorCodes()

/** The `err.code`s that retrying cannot fix (the core's `ErrorCode::is_final`). */
const FINAL_CODES = new Set(errorCodes.filter((c) => c.final).map((c) => c.code))

/** Wrap a native socket fd in a `net.Socket`; libuv recognises it as TCP. */
function socketFromFd (fd, allowHalfOpen) {
  return new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: Boolean(allowHalfOpen) })
}

/** Split `ip:port` or `[v6]:port`. */
function splitHostPort (addr) {
  const m = /^\[?(.*?)\]?:(\d+)$/.exec(addr || '')
  return m ? { address: m[1], port: Number(m[2]) } : { address: addr || '', port: 0 }
}

/** `net.Server.address()` shape for an `ip:port` string. */
function addressInfo (addr) {
  if (!addr) return null
  const { address, port } = splitHostPort(addr)
  return { address, family: net.isIPv6(address) ? 'IPv6' : 'IPv4', port }
}

/** accept() calls kept in flight, so wrapping one stream overlaps with fetching the next. */
const ACCEPTS_IN_FLIGHT = 4

/** Connection-state events a Listener or Dialer emits (the core's `client::events`). */
const STATE_EVENTS = new Set(['connected', 'disconnected', 'reconnecting'])

/**
 * Emit the core's connection-state events on `emitter` while it has a handler for one of them:
 * the native subscription starts with the first handler and stops with the last (it never keeps
 * the process alive). `'disconnected'` carries an `Error` whose `code` is the cause's.
 */
function stateEvents (emitter, raw) {
  let watch = null
  emitter.on('newListener', (event) => {
    if (!STATE_EVENTS.has(event) || watch) return
    watch = raw.watch((name, detail) => emitter.emit(name, detail))
  })
  emitter.on('removeListener', (event) => {
    if (!STATE_EVENTS.has(event) || !watch) return
    if ([...STATE_EVENTS].some((e) => emitter.listenerCount(e) > 0)) return
    watch.stop()
    watch = null
  })
}

/** The `Error` an aborted dial rejects with: `name` `'AbortError'`, `code` `'ABORT_ERR'` (as Node's own). */
function abortError (signal) {
  const err = new Error('the dial was aborted', { cause: signal?.reason })
  err.name = 'AbortError'
  err.code = 'ABORT_ERR'
  return err
}

/** A ref'd handle that keeps the event loop alive while a Server or Forward is open. */
class KeepAlive {
  constructor () { this.timer = setInterval(() => {}, 2 ** 31 - 1) }
  ref () { this.timer?.ref() }
  unref () { this.timer?.unref() }
  stop () { clearInterval(this.timer); this.timer = null }
}

/**
 * A registered reverse listener: an EventEmitter emitting `'connection'` (socket, peer) for every
 * stream the relay routes to its name, `'error'` and `'close'`; and the session's state:
 * `'disconnected'` (err) when it drops, `'reconnecting'` ({ attempt, delay }) before each retry,
 * `'connected'` ({ relay, name }) once registered again.
 */
class Listener extends EventEmitter {
  /**
   * Connect to `relay` and register. `key` is the listener's PEM key or a path to it (default:
   * `TUNNEL_LISTENER_KEY`); `relay` defaults to `TUNNEL_RELAY`.
   */
  static async bind (options = {}) {
    // What is not given comes from TUNNEL_RELAY, TUNNEL_LISTENER_KEY, TUNNEL_CA and
    // TUNNEL_TIMEOUT (and ./.env), read by the core as in every face.
    // The other options pass through by name to the native `ListenerOptions` (the core's).
    const { relay, key, timeout, exit, allowHalfOpen, ...rest } = options
    const raw = await native.NativeListener.bind(relay, keyText(key), {
      ...rest,
      timeoutMs: timeout,
      exit: exit === undefined || typeof exit === 'string' ? exit : JSON.stringify(exit)
    })
    return new Listener(raw, options)
  }

  constructor (raw, options) {
    super()
    this._raw = raw
    this._closed = false
    /** Whether accepted sockets stay writable after the peer's FIN (like net.Server's option). */
    this.allowHalfOpen = Boolean(options.allowHalfOpen)
    stateEvents(this, raw)
    Promise.all(Array.from({ length: ACCEPTS_IN_FLIGHT }, () => this._loop())).then(() => {
      this._closed = true
      this.emit('close')
    })
  }

  /** The registered name (dial it as `NAME:0`). */
  get name () { return this._raw.name }
  /** The public HTTP URL routed to this listener (`http://NAME.<domain>:port`), or null. */
  get url () { return this._raw.httpUrl ?? null }
  /** The public TCP address (`ip:port`), when asked for with `tcpPort: true`, or null. */
  get tcpAddress () { return this._raw.tcpAddr ?? null }
  /** Whether the session to the relay is up right now (it reconnects in the background). */
  get connected () { return this._raw.connected }

  async _loop () {
    for (;;) {
      let got
      try {
        got = await this._raw.accept()
      } catch (err) {
        if (err.code === 'ECLOSED') return
        // The relay ended the registration for good (another session of the key took the name,
        // or a reload withdrew it): say so once, then stop like a close.
        if (FINAL_CODES.has(err.code)) {
          if (!this._ended) {
            this._ended = true
            this.emit('error', err)
          }
          return
        }
        // One stream that could not be handed over (e.g. out of fds); keep accepting.
        this.emit('error', err)
        continue
      }
      const socket = socketFromFd(got.fd, this.allowHalfOpen)
      const from = splitHostPort(got.client)
      const peer = { client: got.client, address: from.address, via: got.via, port: got.port, e2e: got.e2e, dialerName: got.dialerName ?? null }
      // The socket's own peer is the local bridge; report the original client instead.
      Object.defineProperty(socket, 'remoteAddress', { value: from.address, configurable: true })
      Object.defineProperty(socket, 'remotePort', { value: from.port, configurable: true })
      socket.tunnelPeer = peer
      this.emit('connection', socket, peer)
    }
  }

  /**
   * Hand every connection to `server` (an `http.Server`, `https.Server`, `net.Server` or the
   * server of an Express app); closing the server closes the listener. Returns `server`.
   */
  serve (server) {
    if (typeof server?.emit !== 'function') throw invalidArgument('listener.serve(server) needs an http.Server or net.Server')
    this.allowHalfOpen = server.allowHalfOpen ?? this.allowHalfOpen
    this.on('connection', (socket) => server.emit('connection', socket))
    server.once('close', () => this.close())
    return server
  }

  /**
   * Leave a pool's rotation (a rolling restart): the relay sends nothing new at once, queued
   * connections are still emitted, open sockets keep running; `close()` once they are done.
   */
  retire () { this._raw.retire() }

  /** Unregister; emits `'close'` once the accept loop has stopped. Open sockets stay open. */
  close (callback) {
    if (callback) this.once('close', callback)
    this._raw.close()
    return this
  }

  /** `close()` as a Promise. */
  closed () {
    return new Promise((resolve) => (this._closed ? resolve() : this.once('close', resolve)))
  }
}

/** A running local port forward or SOCKS5 proxy. */
class Forward {
  constructor (raw) {
    this._raw = raw
    this._alive = new KeepAlive()
    /** Local IP. */
    this.host = raw.host
    /** Local port. */
    this.port = raw.port
  }

  /** `{ address, family, port }`, like `net.Server.address()`. */
  address () { return addressInfo(`${this.host}:${this.port}`) }
  ref () { this._alive.ref(); return this }
  unref () { this._alive.unref(); return this }

  /** Stop accepting; resolves once the connections in flight have finished. */
  async close () {
    this._alive.stop()
    await this._raw.close()
  }
}

/**
 * A dialer: one authenticated (multiplexed) session to a relay, shared by every dial. An
 * EventEmitter: `'disconnected'` (err) when the session drops, `'connected'` ({ relay, name: null })
 * when a later dial (or `connect()`) opens a new one; it reconnects on demand, not in the background.
 */
class Dialer extends EventEmitter {
  /**
   * Make a dialer and authenticate its session now. `key` is `KID:BASE64` or a file holding it
   * (default: `TUNNEL_KEY`); `relay` defaults to `TUNNEL_RELAY`. Options: `timeout` (ms per
   * dial), `ca` (PEM file for private-CA `wss://`), `classic` (Emissary's protocol), `e2e`
   * (TLS end to end inside dials to listener names; the listener's key must prove the name),
   * `e2ePins` (`{ name: key }` for chosen names), `e2eIdentity` (this dialer's Ed25519 key, for
   * listeners with `allowPeers`), `proxy` (upstream proxy URL or `'none'`; default
   * `TUNNEL_PROXY`, else `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` with `NO_PROXY`).
   */
  static async connect (options = {}) {
    // What is not given comes from TUNNEL_RELAY, TUNNEL_KEY, TUNNEL_CA, TUNNEL_TIMEOUT and
    // TUNNEL_MODE (and ./.env), read by the core as in every face.
    const raw = new native.NativeDialer(options.relay, options.key, {
      timeoutMs: options.timeout,
      ca: options.ca,
      classic: options.classic,
      e2e: options.e2e,
      e2ePins: options.e2ePins,
      e2eIdentity: options.e2eIdentity === undefined ? undefined : keyText(options.e2eIdentity),
      proxy: options.proxy
    })
    await raw.connect()
    return new Dialer(raw)
  }

  constructor (raw) {
    super()
    this._raw = raw
    stateEvents(this, raw)
  }

  /** The relay URL. */
  get relay () { return this._raw.relay }

  /**
   * Open a stream to `host:port` (or a listener's `NAME:0`) as a connected `net.Socket`;
   * `options.via` names an exit listener to reach the target through; `options.signal` (an
   * `AbortSignal`) aborts the dial: it rejects with an `AbortError` (`code` `'ABORT_ERR'`) and
   * whatever it had opened is closed.
   */
  async dial (target, options = {}) {
    const { signal } = options
    if (signal !== undefined && typeof signal?.addEventListener !== 'function') throw invalidArgument('dial(target, { signal }) needs an AbortSignal')
    if (signal?.aborted) throw abortError(signal)
    const pending = this._raw.dial(target, options.via)
    const onAbort = () => pending.cancel()
    signal?.addEventListener('abort', onAbort, { once: true })
    let fd
    try {
      fd = await pending.result()
    } catch (err) {
      throw signal?.aborted ? abortError(signal) : err
    } finally {
      signal?.removeEventListener('abort', onAbort)
    }
    const socket = socketFromFd(fd, options.allowHalfOpen)
    if (signal?.aborted) {
      // Aborted as the dial completed: the caller asked for nothing, so nothing stays open.
      socket.destroy()
      throw abortError(signal)
    }
    return socket
  }

  /** Forward a local port (default: a free one on 127.0.0.1) to `target` (via an exit with `options.via`). */
  async forward (target, options = {}) {
    return new Forward(await this._raw.forward(target, localAddr(options), options.via))
  }

  /** A local SOCKS5 proxy (default: a free port on 127.0.0.1) tunnelling every CONNECT (via an exit with `options.via`). */
  async socks (options = {}) {
    return new Forward(await this._raw.socks(localAddr(options), options.via))
  }

  /** Close the session. */
  async close () { await this._raw.close() }
}

/** An embedded relay. */
class Server {
  /**
   * Start a relay. `config` maps setting names (as `tunnel server --set`, e.g. `listen`,
   * `auth_keys`, `allow`, `http_listen`; camelCase works too) to values; objects and arrays are
   * sent as JSON. Options: `env: true` also reads `TUNNEL_*` variables and `./.env`,
   * `configFile` a TOML file.
   */
  static async start (config = {}, options = {}) {
    const settings = Object.entries(config)
      .filter(([, v]) => v !== undefined && v !== null)
      .map(([k, v]) => [snake(k), typeof v === 'object' ? JSON.stringify(v) : String(v)])
    return new Server(await native.NativeServer.start(settings, { env: options.env, configFile: options.configFile }))
  }

  constructor (raw) {
    this._raw = raw
    this._alive = new KeepAlive()
    /** The URL dialers and listeners use. */
    this.url = raw.url
    /** What `tunnel server` prints when it is up: the URL and every endpoint's address. */
    this.readyText = raw.readyText
  }

  /** The tunnel endpoint, `{ address, family, port }` like `net.Server.address()`. */
  address () { return addressInfo(this._raw.address) }
  /** The public HTTP port (Host routing to listeners), or null. */
  httpAddress () { return addressInfo(this._raw.httpAddress) }
  /** The raw-TCP tunnel endpoint, or null. */
  tcpAddress () { return addressInfo(this._raw.tcpAddress) }
  ref () { this._alive.ref(); return this }
  unref () { this._alive.unref(); return this }

  /** Stop accepting and drain (open streams get `drain_timeout`). */
  async close () {
    this._alive.stop()
    await this._raw.close()
  }

  /** Stop at once, dropping every connection (like a crash). */
  abort () {
    this._alive.stop()
    this._raw.abort()
  }
}

/**
 * Route the core's log events to `callback(level, target, message)`; `filter` uses `RUST_LOG`
 * syntax (default `'info'`). `setLogger(null)` stops. Never keeps the process alive.
 */
function setLogger (callback, filter) {
  native.setLogger(callback ?? null, filter)
}

/** A new shared-secret key: `{ key: 'KID:BASE64', authKeys: '[{"kid":..,"data":..}]' }`. */
function generateKey (kid) { return native.generateKey(kid) }

/** A new Ed25519 listener key `{ pem, name, publicKey }`; written (mode 0600) to `out` if given. */
function generateListenerKey (out) { return native.generateListenerKey(out) }

/** Name and public key of a listener key (PEM text or a path). */
function loadListenerKey (key) { return native.loadListenerKey(keyText(key)) }

function keyText (key) {
  if (key === undefined || key === null) return undefined
  return typeof key === 'object' && key.pem ? key.pem : String(key)
}
function localAddr (options) { return options.port !== undefined ? `${options.host ?? '127.0.0.1'}:${options.port}` : options.local }
function snake (k) { return k.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase()) }

function invalidArgument (message) {
  const err = new Error(message)
  err.code = 'EINVAL'
  err.tunnelCode = 'INVALID_ARGUMENT'
  return err
}

module.exports = {
  Listener,
  Dialer,
  Forward,
  Server,
  setLogger,
  generateKey,
  generateListenerKey,
  loadListenerKey,
  errorCodes,
  demo: native.demo
}
