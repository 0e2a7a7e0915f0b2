'use strict'
// Shared test kit for the Node face: an embedded relay on loopback port 0 with a fresh key,
// listener keys, an echo server, hashing, name resolution for NAME.localhost, and bounded waits.

const crypto = require('node:crypto')
const dns = require('node:dns')
const net = require('node:net')
const { Server, generateKey, generateListenerKey } = require('..')

/** Upper bound for one step that should be quick. */
const STEP_MS = 10_000

/**
 * Start a relay with a public HTTP port, open listener registration and an allowlist of
 * `allow` (default: nothing reachable but 127.0.0.1:9). Returns `{ relay, key, close }`.
 */
async function startRelay ({ allow = [{ host: '127.0.0.1', port: 9 }], ...extra } = {}) {
  const shared = generateKey(7)
  const relay = await Server.start({
    listen: '127.0.0.1:0',
    http_listen: '127.0.0.1:0',
    auth_keys: shared.authKeys,
    allow,
    listeners_open: true,
    drain_timeout: 1,
    // Every test client comes from 127.0.0.1, standing for many real sources.
    max_handshakes_per_source: 1000,
    http_max_requests_per_source: 1000,
    ...extra
  })
  return { relay, key: shared.key, url: relay.url }
}

/**
 * `lookup` for http.request / ws / undici: `*.localhost` is loopback (the relay's default
 * domain), everything else goes to the system resolver. glibc does not resolve `NAME.localhost`
 * by itself, so the tests pass this wherever a listener's URL is fetched.
 */
function lookup (hostname, options, callback) {
  if (typeof options === 'function') [callback, options] = [options, {}]
  if (hostname === 'localhost' || hostname.endsWith('.localhost')) {
    return options.all ? callback(null, [{ address: '127.0.0.1', family: 4 }]) : callback(null, '127.0.0.1', 4)
  }
  return dns.lookup(hostname, options, callback)
}

/**
 * An echo server on 127.0.0.1: copies back what it reads, ends after the client's FIN. A reset
 * from the relay (a test that kills it) just closes the connection.
 */
async function echoServer () {
  const server = net.createServer({ allowHalfOpen: true }, (s) => s.on('error', () => s.destroy()).pipe(s))
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  return server
}

/** Random bytes (the tests hash both ends, so they need not be reproducible). */
function payload (len) {
  return crypto.randomBytes(len)
}

function sha256 (buf) {
  return crypto.createHash('sha256').update(buf).digest('hex')
}

/** Hash everything a readable stream yields (leaving a socket's writable side open). */
async function hashStream (readable) {
  const h = crypto.createHash('sha256')
  let bytes = 0
  const chunks = typeof readable.iterator === 'function' ? readable.iterator({ destroyOnReturn: false }) : readable
  for await (const chunk of chunks) {
    h.update(chunk)
    bytes += chunk.length
  }
  return { hash: h.digest('hex'), bytes }
}

/** Await `promise`, failing with `what` after `ms`. */
async function within (ms, what, promise) {
  let timer
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Await the rejection of `promise` and return its error (fails if it resolves). */
async function rejection (promise, what) {
  try {
    await within(STEP_MS, what, promise)
  } catch (err) {
    return err
  }
  throw new Error(`${what} succeeded but should have failed`)
}

module.exports = { STEP_MS, startRelay, lookup, echoServer, payload, sha256, hashStream, within, rejection, generateListenerKey }
