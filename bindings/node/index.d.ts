// Types of the hand-written layer (index.js). The raw native layer's are in native.d.ts.
import { EventEmitter } from 'node:events'
import type { Socket, AddressInfo } from 'node:net'

/** An `Error` from libtunnel: `code` is the core's Node-style code, `tunnelCode` its name. */
export interface TunnelError extends Error {
  /** `'EAUTH'`, `'EAUTHKEY'`, `'EAUTHCLOCK'`, `'ENOTALLOWED'`, `'EUNREACHABLE'`, `'ECONNREFUSED'`, `'ETIMEDOUT'`, `'EPROTO'`, `'ERELAYUNAVAILABLE'`, `'EINVALIDCONFIG'`, `'EINVAL'`, `'ECLOSED'`, `'EIO'`, `'EGENERAL'`, `'ENAMETAKEN'`, `'EE2EIDENTITY'`, `'EE2EREFUSED'`. */
  code: string
  /** The SCREAMING name shared with the C and Python faces, e.g. `'NOT_ALLOWED'`. */
  tunnelCode: string
}

/** `'connected'`: a session to the relay is up (a listener registered `name`; a dialer's is null). */
export interface ConnectedEvent {
  /** The relay URL. */
  relay: string
  /** The registered name (listeners), or null (dialers). */
  name: string | null
}

/** `'reconnecting'`: a listener waits `delay` ms before its `attempt`-th retry (from 1). */
export interface ReconnectingEvent {
  attempt: number
  delay: number
}

/** What an aborted `dial()` rejects with. */
export interface AbortError extends Error {
  name: 'AbortError'
  code: 'ABORT_ERR'
  /** The signal's `reason`. */
  cause?: unknown
}

/** One row of the core's error table. */
export interface ErrorCodeInfo {
  number: number
  name: string
  code: string
  /** Whether retrying cannot help until something changes (a refusal); the same rule in every face. */
  final: boolean
}

/** Who is on the other end of an accepted stream. */
export interface PeerInfo {
  /** The original client's `ip:port` as the relay saw it. */
  client: string
  /** The client's IP. */
  address: string
  /** How the stream arrived. */
  via: 'dial' | 'http' | 'tcp'
  /** The port label a dialer asked for (0 = default), or the public TCP port. */
  port: number
  /** Whether the stream is end-to-end encrypted (the listener has `e2e` on). */
  e2e: boolean
  /** The dialer's verified key-derived name (`e2e` with `allowPeers`), else null. */
  dialerName: string | null
}

export interface ListenerBindOptions {
  /** Relay URL (`ws://`, `wss://`, `tcp://`, `grpc://`, `grpcs://`, `quic://`); default `TUNNEL_RELAY`. */
  relay?: string
  /** Listener key: PEM text, a PEM file path, or `{ pem }`; default `TUNNEL_LISTENER_KEY`. */
  key?: string | { pem: string }
  /** Register this name instead of the key-derived one (the relay must grant it). */
  name?: string
  /** Ask the relay for a public TCP port. */
  tcpPort?: boolean
  /** The local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server). */
  h2c?: boolean
  /** The relay's HTTPS port passes connections whose SNI names this listener through undecrypted. */
  tlsPassthrough?: boolean
  /** Milliseconds connecting and registering may take (default 20 000). */
  timeout?: number
  /** Streams waiting for 'connection' before the relay refuses more (default 128, the core's). */
  backlog?: number
  /** PEM file of CA certificates to trust for `wss://`, `grpcs://` and `quic://`. */
  ca?: string
  /** Keep accepted sockets writable after the peer's FIN (default false, like net.Server). */
  allowHalfOpen?: boolean
  /** Join the name's pool of replicas (every replica opts in; the relay spreads connections). */
  pool?: boolean
  /**
   * Upstream proxy to reach the relay through: `http://user:pass@host:port`, `https://…`,
   * `socks5://…`, or `'none'`. Default: `TUNNEL_PROXY`, else `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`
   * with `NO_PROXY` (curl's rules). The password never appears in errors or logs.
   */
  proxy?: string
  /**
   * Be an exit listener: allow rules (`[{ host: 'db.internal', port: 5432 }]` or their JSON, the
   * relay's `allow` syntax) for targets dialers reach through it with `dial(target, { via })`.
   */
  exit?: string | Array<{ host: string, port: number | string }>
  /** With `exit`: this listener exposes no service, so dials to its name are refused (`'ENOTALLOWED'`) instead of reaching nobody. */
  exitOnly?: boolean
  /** End-to-end encryption: terminate TLS on every stream (the relay sees only ciphertext) and refuse plaintext ones. */
  e2e?: boolean
  /** With `e2e`: require dialers' own keys and admit these (base64 public keys or key-derived names). */
  allowPeers?: string[]
}

export interface Listener extends EventEmitter {
  on(event: 'connection', listener: (socket: Socket & { tunnelPeer: PeerInfo }, peer: PeerInfo) => void): this
  on(event: 'error', listener: (err: TunnelError) => void): this
  on(event: 'close', listener: () => void): this
  /** The session to the relay is up again (re-registered under `name`). */
  on(event: 'connected', listener: (info: ConnectedEvent) => void): this
  /** The session dropped; `err.code` says why (`'ERELAYUNAVAILABLE'`, `'ECLOSED'` after `close()`, `'ENAMETAKEN'`). */
  on(event: 'disconnected', listener: (err: TunnelError) => void): this
  on(event: 'reconnecting', listener: (info: ReconnectingEvent) => void): this
  on(event: string | symbol, listener: (...args: any[]) => void): this
  once(event: 'connected', listener: (info: ConnectedEvent) => void): this
  once(event: 'disconnected', listener: (err: TunnelError) => void): this
  once(event: 'reconnecting', listener: (info: ReconnectingEvent) => void): this
  once(event: 'connection', listener: (socket: Socket & { tunnelPeer: PeerInfo }, peer: PeerInfo) => void): this
  once(event: 'error', listener: (err: TunnelError) => void): this
  once(event: 'close', listener: () => void): this
  once(event: string | symbol, listener: (...args: any[]) => void): this
}

/** A registered reverse listener; an open one keeps the process alive. */
export class Listener extends EventEmitter {
  static bind(options?: ListenerBindOptions): Promise<Listener>
  private constructor()
  /** The registered name (dial it as `NAME:0`). */
  readonly name: string
  /** The public HTTP URL (`http://NAME.<domain>:port`), or null when the relay has no HTTP port. */
  readonly url: string | null
  /** The public TCP address, when asked for with `tcpPort`. */
  readonly tcpAddress: string | null
  /** Whether the session to the relay is up right now. */
  readonly connected: boolean
  allowHalfOpen: boolean
  /** Hand every connection to `server` (http/https/net.Server, an Express app's server); closing it closes the listener. */
  serve<S extends EventEmitter>(server: S): S
  /** Leave a pool's rotation: nothing new arrives, open sockets keep running. */
  retire(): void
  /** Unregister; 'close' follows once the accept loop has stopped. */
  close(callback?: () => void): this
  /** Resolves on 'close'. */
  closed(): Promise<void>
}

export interface DialerConnectOptions {
  /** Relay URL; default `TUNNEL_RELAY`. */
  relay?: string
  /** `KID:BASE64` or a file holding it; default `TUNNEL_KEY`. */
  key?: string
  /** Milliseconds one dial may take (default 20 000). */
  timeout?: number
  /** PEM file of CA certificates to trust for `wss://`, `grpcs://` and `quic://`. */
  ca?: string
  /** Speak Emissary's classic protocol (one WebSocket per connection, no half-close). */
  classic?: boolean
  /** End-to-end encrypt dials to listener names; the listener's key must prove the name dialed. */
  e2e?: boolean
  /** With `e2e`: chosen (relay-granted) names pinned to their listener's key (base64 or key-derived name). */
  e2ePins?: Record<string, string>
  /** With `e2e`: this dialer's Ed25519 key (PEM text, file path or `{ pem }`), for listeners with `allowPeers`. */
  e2eIdentity?: string | { pem: string }
  /**
   * Upstream proxy to reach the relay through: `http://user:pass@host:port`, `https://…`,
   * `socks5://…`, or `'none'`. Default: `TUNNEL_PROXY`, else `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`
   * with `NO_PROXY` (curl's rules). The password never appears in errors or logs.
   */
  proxy?: string
}

export interface LocalAddressOptions {
  /** Local IP (default 127.0.0.1) and port (default: a free one). */
  host?: string
  port?: number
  /** Or a whole `ip:port`. */
  local?: string
}

/** A running local port forward or SOCKS5 proxy; keeps the process alive until closed or unref'd. */
export class Forward {
  private constructor()
  readonly host: string
  readonly port: number
  address(): AddressInfo
  ref(): this
  unref(): this
  /** Stop accepting; resolves once the connections in flight have finished. */
  close(): Promise<void>
}

export interface Dialer extends EventEmitter {
  /** A new session is up (on `connect()` or the first dial after a loss). */
  on(event: 'connected', listener: (info: ConnectedEvent) => void): this
  /** The session dropped; `err.code` says why (`'ERELAYUNAVAILABLE'`, `'ECLOSED'` after `close()`). */
  on(event: 'disconnected', listener: (err: TunnelError) => void): this
  on(event: string | symbol, listener: (...args: any[]) => void): this
  once(event: 'connected', listener: (info: ConnectedEvent) => void): this
  once(event: 'disconnected', listener: (err: TunnelError) => void): this
  once(event: string | symbol, listener: (...args: any[]) => void): this
}

/** One authenticated session to a relay, shared by every dial; reconnects on the next dial after a loss. */
export class Dialer extends EventEmitter {
  static connect(options?: DialerConnectOptions): Promise<Dialer>
  private constructor()
  readonly relay: string
  /** A connected `net.Socket` to `host:port` (or a listener's `NAME:0`); `socket.end()` half-closes. */
  /** `via`: reach the target through this exit listener (inside its network). */
  /** `signal`: abort the dial; it then rejects with an {@link AbortError} (`code` `'ABORT_ERR'`). */
  dial(target: string, options?: { allowHalfOpen?: boolean, via?: string, signal?: AbortSignal }): Promise<Socket>
  forward(target: string, options?: LocalAddressOptions & { via?: string }): Promise<Forward>
  socks(options?: LocalAddressOptions & { via?: string }): Promise<Forward>
  close(): Promise<void>
}

/** Relay settings by name (as `tunnel server --set`; camelCase works); objects are sent as JSON. */
export type RelaySettings = Record<string, string | number | boolean | object | undefined | null>

/** An embedded relay; keeps the process alive until closed or unref'd. */
export class Server {
  static start(config?: RelaySettings, options?: { env?: boolean, configFile?: string }): Promise<Server>
  private constructor()
  /** The URL dialers and listeners use. */
  readonly url: string
  /** What `tunnel server` prints when it is up: the URL and every endpoint's address. */
  readonly readyText: string
  address(): AddressInfo | null
  httpAddress(): AddressInfo | null
  tcpAddress(): AddressInfo | null
  ref(): this
  unref(): this
  /** Stop accepting and drain. */
  close(): Promise<void>
  /** Stop at once, dropping every connection. */
  abort(): void
}

export function setLogger(callback: ((level: 'error' | 'warn' | 'info' | 'debug' | 'trace', target: string, message: string) => void) | null, filter?: string): void
export function generateKey(kid?: number): { key: string, authKeys: string }
export function generateListenerKey(out?: string): { pem: string, name: string, publicKey: string }
export function loadListenerKey(key: string | { pem: string }): { pem: string, name: string, publicKey: string }
export const errorCodes: ErrorCodeInfo[]
/** The narrated loopback demo (`libtunnel demo`). */
export function demo(): Promise<void>
