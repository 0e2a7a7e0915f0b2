'use strict'
// A node:http2 h2c server behind Listener.bind({ h2c: true }), reached through the relay's public
// HTTP port by node:http2 with prior knowledge: requests multiplexed on one client session,
// response trailers intact (what gRPC status rides on), a 10 MiB upload hashed, and an HTTP/1.1
// client (undici) served by the same HTTP/2-only service.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const http2 = require('node:http2')
const { once } = require('node:events')
const undici = require('undici')
const { Listener } = require('..')
const { startRelay, lookup, payload, sha256, hashStream, within, generateListenerKey, STEP_MS } = require('./helpers')

const BIG = payload(10 * 1024 * 1024)
let env, listener, server, client
const sessions = new Set()

before(async () => {
  env = await startRelay()
  listener = await Listener.bind({ relay: env.url, key: generateListenerKey().pem, h2c: true })
  server = http2.createServer()
  server.on('session', (s) => { sessions.add(s); s.once('close', () => sessions.delete(s)) })
  server.on('stream', async (stream, headers) => {
    const path = headers[':path']
    if (path === '/upload') {
      const { hash, bytes } = await hashStream(stream)
      stream.respond({ ':status': 200, 'content-type': 'application/json' })
      return stream.end(JSON.stringify({ hash, bytes }))
    }
    stream.respond({ ':status': 200, 'x-seen-version': 'h2', 'x-seen-path': path }, { waitForTrailers: true })
    stream.on('wantTrailers', () => stream.sendTrailers({ 'x-status': '0', 'x-message': `done ${path}` }))
    stream.end(`hello ${path}`)
  })
  listener.serve(server)
  client = http2.connect(listener.url, { lookup })
  await within(STEP_MS, 'h2c session', once(client, 'connect'))
})

after(async () => {
  client?.close()
  for (const s of sessions) s.destroy()
  server?.close()
  listener?.close()
  await listener?.closed()
  await env?.relay.close()
})

function request (path, body) {
  return new Promise((resolve, reject) => {
    const req = client.request({ ':path': path, ':method': body ? 'POST' : 'GET' })
    const chunks = []
    let headers, trailers
    req.on('response', (h) => { headers = h })
    req.on('trailers', (t) => { trailers = t })
    req.on('data', (c) => chunks.push(c))
    req.on('end', () => resolve({ headers, trailers, body: Buffer.concat(chunks) }))
    req.on('error', reject)
    req.end(body)
  })
}

test('h2c through the relay: 50 concurrent streams on one session, trailers intact', async () => {
  const answers = await within(STEP_MS * 3, '50 streams', Promise.all(Array.from({ length: 50 }, (_, i) => request(`/n/${i}`))))
  answers.forEach((a, i) => {
    assert.equal(a.headers[':status'], 200)
    assert.equal(a.headers['x-seen-path'], `/n/${i}`)
    assert.equal(a.body.toString(), `hello /n/${i}`)
    assert.equal(a.trailers?.['x-status'], '0')
    assert.equal(a.trailers?.['x-message'], `done /n/${i}`)
  })
})

test('h2c through the relay: 10 MiB upload hashed by the service', async () => {
  const a = await within(STEP_MS * 6, 'upload', request('/upload', BIG))
  assert.deepEqual(JSON.parse(a.body.toString()), { hash: sha256(BIG), bytes: BIG.length })
})

test('an HTTP/1.1 client reaches the HTTP/2-only service through the relay', async () => {
  const dispatcher = new undici.Agent({ connect: { lookup } })
  try {
    const res = await within(STEP_MS, 'fetch', undici.fetch(`${listener.url}/h1`, { dispatcher }))
    assert.equal(res.status, 200)
    assert.equal(res.headers.get('x-seen-version'), 'h2')
    assert.equal(await res.text(), 'hello /h1')
  } finally {
    await dispatcher.close()
  }
})
