'use strict'
// Pools and exit listeners from Node: two replicas of one name share the dials (round-robin) and
// a retired one gets nothing new; an exit listener connects `dial(target, { via })` to a target
// the relay's own allowlist does not admit, and refuses one outside its own rules with ENOTALLOWED.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { once } = require('node:events')
const { Dialer, Listener } = require('..')
const { startRelay, echoServer, payload, sha256, hashStream, within, rejection, generateListenerKey, STEP_MS } = require('./helpers')

/** Echo every accepted connection and count them. */
function serveEcho (listener) {
  const seen = { count: 0 }
  listener.on('connection', (socket) => {
    seen.count++
    socket.on('error', () => socket.destroy()).pipe(socket)
  })
  return seen
}

async function ping (dialer, target, options) {
  const socket = await dialer.dial(target, options)
  const data = payload(1024)
  socket.end(data)
  const got = await within(STEP_MS, 'echo', hashStream(socket))
  assert.equal(got.hash, sha256(data))
  socket.destroy()
}

test('pool: two replicas share the dials; a retired one gets nothing new', async () => {
  const env = await startRelay()
  const key = generateListenerKey()
  const a = await Listener.bind({ relay: env.url, key: key.pem, pool: true })
  const b = await Listener.bind({ relay: env.url, key: key.pem, pool: true })
  const [sa, sb] = [serveEcho(a), serveEcho(b)]
  const dialer = await Dialer.connect({ relay: env.url, key: env.key })
  for (let i = 0; i < 10; i++) await ping(dialer, `${key.name}:0`)
  assert.equal(sa.count, 5)
  assert.equal(sb.count, 5)
  a.retire()
  for (let i = 0; i < 6; i++) await ping(dialer, `${key.name}:0`)
  assert.equal(sa.count, 5, 'a retired replica got a new connection')
  assert.equal(sb.count, 11)
  // The retired replica's accept loop has ended (its queue is closed).
  await within(STEP_MS, 'the retired replica closes', a.closed())
  a.close()
  // Without `pool`, the same key takes the name over (today's rule): the replica is told why.
  const replaced = once(b, 'error')
  const c = await Listener.bind({ relay: env.url, key: key.pem })
  const [err] = await within(STEP_MS, 'the replaced replica reports it', replaced)
  assert.equal(err.code, 'ENAMETAKEN')
  await within(STEP_MS, 'the replaced replica closes', b.closed())
  c.close()
  await dialer.close()
  await env.relay.close()
})

test('exit: dial via an exit listener; its own allowlist decides', async () => {
  const echo = await echoServer()
  const other = await echoServer()
  const exitKey = generateListenerKey()
  // The relay's allowlist admits neither echo server.
  const env = await startRelay({ exits: [{ name: exitKey.name, key_ids: [7] }] })
  // It serves nothing itself (no 'connection' handler): exitOnly, so a dial to its name is refused.
  const exit = await Listener.bind({ relay: env.url, key: exitKey.pem, exit: [{ host: '127.0.0.1', port: echo.address().port }], exitOnly: true })
  const dialer = await Dialer.connect({ relay: env.url, key: env.key })
  await ping(dialer, `127.0.0.1:${echo.address().port}`, { via: exitKey.name })
  // A local port forward through the exit.
  const fwd = await dialer.forward(`127.0.0.1:${echo.address().port}`, { via: exitKey.name })
  const socket = net.connect(fwd.port, fwd.host)
  await within(STEP_MS, 'connect', once(socket, 'connect'))
  const data = payload(256 * 1024)
  socket.end(data)
  assert.equal((await within(STEP_MS, 'forwarded echo', hashStream(socket))).hash, sha256(data))
  await within(STEP_MS, 'forward close', fwd.close())
  let err = await rejection(dialer.dial(`127.0.0.1:${other.address().port}`, { via: exitKey.name }), 'outside the exit')
  assert.equal(err.code, 'ENOTALLOWED')
  assert.match(err.message, new RegExp(exitKey.name))
  err = await rejection(dialer.dial(`127.0.0.1:${echo.address().port}`), 'without via')
  assert.equal(err.code, 'ENOTALLOWED')
  assert.match(err.message, /TUNNEL_ALLOW/)
  err = await rejection(dialer.dial(`${exitKey.name}:0`), 'the exit-only name')
  assert.equal(err.code, 'ENOTALLOWED')
  assert.match(err.message, /exposes no service/)
  // The options' rules are the core's, the same in every face.
  err = await rejection(Listener.bind({ relay: env.url, key: exitKey.pem, exitOnly: true }), 'exitOnly without exit')
  assert.equal(err.code, 'EINVAL')
  exit.close()
  await dialer.close()
  echo.close()
  other.close()
  await env.relay.close()
})
