'use strict'
// Dialer: a 64 MiB round trip through an echo server, hashed, with half-close by socket.end();
// a local port forward; dialing a listener by name.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { once } = require('node:events')
const { Dialer, Listener } = require('..')
const { startRelay, echoServer, payload, sha256, hashStream, within, generateListenerKey, STEP_MS } = require('./helpers')

const MIB = 1024 * 1024
let env, echo, dialer

before(async () => {
  echo = await echoServer()
  env = await startRelay({ allow: [{ host: '127.0.0.1', port: echo.address().port }] })
  dialer = await Dialer.connect({ relay: env.url, key: env.key })
})

after(async () => {
  await dialer?.close()
  echo?.close()
  await env?.relay.close()
})

/** Write `data` to `socket` in pieces with backpressure, then half-close. */
async function sendAndEnd (socket, data) {
  for (let off = 0; off < data.length; off += 1 * MIB) {
    if (!socket.write(data.subarray(off, off + 1 * MIB))) await once(socket, 'drain')
  }
  socket.end()
}

test('dial: 64 MiB through an echo server, hashed, half-closed with socket.end()', async () => {
  const data = payload(64 * MIB)
  const socket = await dialer.dial(`127.0.0.1:${echo.address().port}`)
  assert.ok(socket instanceof net.Socket)
  const [got] = await within(120_000, '64 MiB echo', Promise.all([hashStream(socket), sendAndEnd(socket, data)]))
  assert.deepEqual(got, { hash: sha256(data), bytes: data.length })
  socket.destroy()
})

test('forward: a local port any client can use', async () => {
  const fwd = await dialer.forward(`127.0.0.1:${echo.address().port}`)
  assert.equal(fwd.address().address, '127.0.0.1')
  const socket = net.connect(fwd.port, fwd.host)
  await within(STEP_MS, 'connect', once(socket, 'connect'))
  const data = payload(1 * MIB)
  const [got] = await within(STEP_MS, 'forwarded echo', Promise.all([hashStream(socket), sendAndEnd(socket, data)]))
  assert.equal(got.hash, sha256(data))
  await within(STEP_MS, 'forward close', fwd.close())
})

test('dial a listener by name: bytes both ways and half-close', async (t) => {
  const listener = await Listener.bind({ relay: env.url, key: generateListenerKey().pem, allowHalfOpen: true })
  t.after(() => listener.close())
  listener.on('connection', (socket, peer) => {
    assert.equal(peer.via, 'dial')
    // Answer with the hash of everything received, after the dialer's FIN.
    hashStream(socket).then(({ hash }) => socket.end(hash))
  })
  const socket = await dialer.dial(`${listener.name}:0`)
  const data = payload(2 * MIB)
  const reply = async () => {
    let text = ''
    for await (const chunk of socket) text += chunk
    return text
  }
  const [text] = await within(STEP_MS, 'hash reply', Promise.all([reply(), sendAndEnd(socket, data)]))
  assert.equal(text, sha256(data))
  listener.close()
  await within(STEP_MS, 'listener close', listener.closed())
})

test('a listener over the gRPC transport (grpc://) is dialed by name: bytes both ways and half-close', async (t) => {
  const listener = await Listener.bind({ relay: env.url.replace('ws://', 'grpc://'), key: generateListenerKey().pem, allowHalfOpen: true })
  t.after(() => listener.close())
  listener.on('connection', (socket) => {
    hashStream(socket).then(({ hash }) => socket.end(hash))
  })
  const socket = await dialer.dial(`${listener.name}:0`)
  const data = payload(4 * MIB)
  const reply = async () => {
    let text = ''
    for await (const chunk of socket) text += chunk
    return text
  }
  const [text] = await within(STEP_MS, 'hash reply', Promise.all([reply(), sendAndEnd(socket, data)]))
  assert.equal(text, sha256(data))
  listener.close()
  await within(STEP_MS, 'listener close', listener.closed())
})

test('relay killed mid-transfer: the socket errors with ECONNRESET, never a clean end', async () => {
  const own = await startRelay({ allow: [{ host: '127.0.0.1', port: echo.address().port }] })
  const d = await Dialer.connect({ relay: own.url, key: own.key })
  try {
    const socket = await d.dial(`127.0.0.1:${echo.address().port}`)
    socket.write(payload(64 * 1024))
    await within(STEP_MS, 'first echo bytes', once(socket, 'data'))
    const outcome = new Promise((resolve) => {
      socket.on('error', (err) => resolve(err.code))
      socket.on('end', () => resolve('clean end'))
    })
    own.relay.abort()
    assert.equal(await within(STEP_MS, 'the cut-off reaching the socket', outcome), 'ECONNRESET')
    socket.destroy()
  } finally {
    await d.close()
  }
})
