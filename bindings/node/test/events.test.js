'use strict'
// Connection-state events and aborted dials, against embedded relays on loopback: a relay that
// dies under a Listener and a Dialer makes both emit 'disconnected' (an Error with code
// ERELAYUNAVAILABLE); a relay started again on the same port makes them emit 'connected' and
// hashed bytes flow again. A dial stuck in a handshake that never comes rejects at once with an
// AbortError (code ABORT_ERR) when its signal aborts, its connection is closed, and a dial
// waiting behind it goes through. Every wait is bounded.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { once } = require('node:events')
const { Dialer, Listener, Server, generateKey, generateListenerKey } = require('..')
const { STEP_MS, echoServer, payload, sha256, hashStream, within } = require('./helpers')

function relayConfig (authKeys, allowPort, listen = '127.0.0.1:0') {
  return { listen, auth_keys: authKeys, allow: [{ host: '127.0.0.1', port: allowPort }], listeners_open: true, drain_timeout: 1, max_handshakes_per_source: 1000 }
}

/** Dial `target` and check that 256 KiB come back from an echo unchanged (by hash). */
async function hashedRoundTrip (dialer, target) {
  const data = payload(256 * 1024)
  const socket = await within(STEP_MS, `dial ${target}`, dialer.dial(target))
  const back = hashStream(socket)
  socket.end(data)
  const { hash, bytes } = await within(STEP_MS, 'the echo', back)
  assert.equal(bytes, data.length)
  assert.equal(hash, sha256(data))
  socket.destroy()
}

test('a listener and a dialer emit disconnected when the relay dies and connected when one is back on the port', async () => {
  const echo = await echoServer()
  const shared = generateKey(7)
  const relay = await Server.start(relayConfig(shared.authKeys, echo.address().port))
  const port = relay.address().port
  const listener = await Listener.bind({ relay: relay.url, key: generateListenerKey().pem })
  listener.on('connection', (socket) => socket.on('error', () => socket.destroy()).pipe(socket))
  const dialer = await Dialer.connect({ relay: relay.url, key: shared.key })
  const target = `127.0.0.1:${echo.address().port}`
  try {
    await hashedRoundTrip(dialer, target)
    await hashedRoundTrip(dialer, `${listener.name}:0`)

    const lost = [once(listener, 'disconnected'), once(dialer, 'disconnected')]
    const retrying = once(listener, 'reconnecting')
    const t0 = Date.now()
    relay.abort()
    for (const [who, event] of [['listener', lost[0]], ['dialer', lost[1]]]) {
      const [err] = await within(STEP_MS, `the ${who}'s 'disconnected'`, event)
      assert.ok(err instanceof Error, `${who}: an Error`)
      assert.equal(err.code, 'ERELAYUNAVAILABLE', `${who}: ${err.message}`)
      assert.equal(err.tunnelCode, 'RELAY_UNAVAILABLE')
    }
    console.log(`disconnected emitted ${Date.now() - t0} ms after the relay died`)
    const [retry] = await within(STEP_MS, "the listener's 'reconnecting'", retrying)
    assert.ok(retry.attempt >= 1 && retry.delay > 0 && Number.isInteger(retry.delay), `whole milliseconds: ${JSON.stringify(retry)}`)
    assert.equal(listener.connected, false)

    const back = once(listener, 'connected')
    const relay2 = await Server.start(relayConfig(shared.authKeys, echo.address().port, `127.0.0.1:${port}`))
    try {
      const [info] = await within(STEP_MS, "the listener's 'connected'", back)
      assert.equal(info.name, listener.name)
      assert.ok(info.relay.startsWith(relay2.url.replace(/\/$/, '')), info.relay)
      // The dialer reconnects on its next dial, and says so.
      const dialerBack = once(dialer, 'connected')
      await hashedRoundTrip(dialer, target)
      const [dinfo] = await within(STEP_MS, "the dialer's 'connected'", dialerBack)
      assert.equal(dinfo.name, null)
      await hashedRoundTrip(dialer, `${listener.name}:0`)

      // close() ends with a last 'disconnected' carrying ECLOSED.
      const closed = once(listener, 'disconnected')
      listener.close()
      const [err] = await within(STEP_MS, "the listener's last 'disconnected'", closed)
      assert.equal(err.code, 'ECLOSED')
      await within(STEP_MS, "the listener's 'close'", listener.closed())
    } finally {
      await dialer.close()
      await relay2.close()
    }
  } finally {
    listener.close()
    echo.close()
  }
})

/**
 * A relay front: the connections numbered in `silent` (from 1) are accepted and never answered
 * (a dial's handshake hangs on them); the others are piped to `relayPort`. `closedSilent` resolves
 * as each silent one is closed by the dialer.
 */
async function front (relayPort, silent) {
  let n = 0
  const silentClosed = []
  const closedWaiters = []
  const server = net.createServer((socket) => {
    n += 1
    if (silent.has(n)) {
      socket.on('error', () => {})
      socket.on('close', () => {
        silentClosed.push(n)
        closedWaiters.splice(0).forEach((w) => w())
      })
      socket.resume()
      return
    }
    const upstream = net.connect(relayPort, '127.0.0.1')
    upstream.on('error', () => socket.destroy())
    socket.on('error', () => upstream.destroy())
    socket.pipe(upstream).pipe(socket)
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const closedSilent = (count) => new Promise((resolve) => {
    const check = () => (silentClosed.length >= count ? resolve() : closedWaiters.push(check))
    check()
  })
  return { server, port: server.address().port, closedSilent, connections: () => n }
}

test('an AbortSignal aborts a dial stuck in the handshake; nothing stays open and the next dial works', async () => {
  const echo = await echoServer()
  const shared = generateKey(7)
  const relay = await Server.start(relayConfig(shared.authKeys, echo.address().port))
  // Connection 1: connect() (proxied); 2: the aborted dial's new session (silent); 3: the next.
  const fr = await front(relay.address().port, new Set([2]))
  const dialer = await Dialer.connect({ relay: `ws://127.0.0.1:${fr.port}`, key: shared.key })
  const target = `127.0.0.1:${echo.address().port}`
  try {
    // An already aborted signal: no connection at all.
    const early = await dialer.dial(target, { signal: AbortSignal.abort() }).catch((e) => e)
    assert.equal(early.name, 'AbortError')
    assert.equal(early.code, 'ABORT_ERR')
    await assert.rejects(dialer.dial(target, { signal: 'nope' }), (e) => e.code === 'EINVAL')

    await dialer.close() // the next dial opens a new session: connection 2, which never answers
    const ac = new AbortController()
    const stuck = dialer.dial(target, { signal: ac.signal })
    await within(STEP_MS, 'the silent connection', new Promise((resolve) => {
      const poll = setInterval(() => { if (fr.connections() >= 2) { clearInterval(poll); resolve() } }, 5)
    }))
    // Only now: two dials started together reach the runtime in either order, and the one that
    // makes the silent connection must be the aborted one.
    const behind = dialer.dial(target) // waits for the session the stuck dial is making
    const t0 = Date.now()
    const reason = new Error('the user gave up')
    ac.abort(reason)
    const err = await within(1000, 'the aborted dial to reject', stuck.catch((e) => e))
    const took = Date.now() - t0
    assert.equal(err.name, 'AbortError')
    assert.equal(err.code, 'ABORT_ERR')
    assert.equal(err.cause, reason)
    console.log(`aborted dial rejected ${took} ms after abort()`)
    await within(STEP_MS, 'the aborted dial\'s connection to be closed', fr.closedSilent(1))

    // The dial behind it got a fresh session (connection 3) and carries bytes.
    const socket = await within(STEP_MS, 'the dial behind the aborted one', behind)
    const data = payload(64 * 1024)
    const back = hashStream(socket)
    socket.end(data)
    assert.equal((await within(STEP_MS, 'the echo', back)).hash, sha256(data))
    socket.destroy()
    await hashedRoundTrip(dialer, target)
  } finally {
    await dialer.close()
    await relay.close()
    fr.server.close()
    echo.close()
  }
})
