'use strict'
// A node:http server behind Listener.bind, reached through the relay's public HTTP port:
// fetch() (undici, resolving NAME.localhost to loopback), 10 MiB bodies both ways hashed,
// server-sent events, a WebSocket upgrade (ws on both ends) and 500 concurrent requests.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const http = require('node:http')
const { once } = require('node:events')
const undici = require('undici')
const { WebSocket, WebSocketServer } = require('ws')
const { Listener } = require('..')
const { startRelay, lookup, payload, sha256, hashStream, within, generateListenerKey, STEP_MS } = require('./helpers')

const MIB = 1024 * 1024
const BIG = payload(10 * MIB)
let env, listener, server, wss, dispatcher

before(async () => {
  env = await startRelay()
  // Room for the 500 concurrent requests below (the default backlog, 128, answers the rest 503).
  listener = await Listener.bind({ relay: env.url, key: generateListenerKey().pem, backlog: 512 })
  server = http.createServer(async (req, res) => {
    if (req.url === '/hello') {
      res.setHeader('x-tunnel-test', 'yes')
      res.setHeader('x-seen-forwarded-host', req.headers['x-forwarded-host'] ?? '')
      res.writeHead(201, { 'content-type': 'text/plain' })
      return res.end(`hello ${req.method}`)
    }
    if (req.url === '/big') {
      res.writeHead(200, { 'content-type': 'application/octet-stream' })
      // Stream in 64 KiB pieces, respecting backpressure.
      for (let off = 0; off < BIG.length; off += 64 * 1024) {
        if (!res.write(BIG.subarray(off, off + 64 * 1024))) await once(res, 'drain')
      }
      return res.end()
    }
    if (req.url === '/upload') {
      const { hash, bytes } = await hashStream(req)
      return res.end(JSON.stringify({ hash, bytes }))
    }
    if (req.url === '/sse') {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' })
      let n = 0
      const tick = () => {
        res.write(`id: ${n}\ndata: event ${n}\n\n`)
        if (++n < 5) setImmediate(tick)
        else res.end()
      }
      return tick()
    }
    if (req.url.startsWith('/n/')) return res.end(req.url.slice(3))
    res.writeHead(404).end()
  })
  wss = new WebSocketServer({ server })
  wss.on('connection', (ws) => ws.on('message', (data, binary) => ws.send(binary ? data : `echo: ${data}`, { binary })))
  listener.serve(server)
  dispatcher = new undici.Agent({ connect: { lookup } })
})

after(async () => {
  await dispatcher?.close()
  for (const c of wss?.clients ?? []) c.terminate()
  server?.closeAllConnections()
  server?.close()
  await listener?.closed()
  await env?.relay.close()
})

test('listener has a name and a public URL on the relay', () => {
  assert.match(listener.name, /^[a-z2-7]{26}$/)
  assert.equal(listener.url, `http://${listener.name}.localhost:${env.relay.httpAddress().port}`)
})

test('fetch(): status, headers and body through the relay', async () => {
  const res = await within(STEP_MS, 'fetch', undici.fetch(`${listener.url}/hello`, { method: 'POST', dispatcher }))
  assert.equal(res.status, 201)
  assert.equal(res.headers.get('x-tunnel-test'), 'yes')
  assert.equal(res.headers.get('x-seen-forwarded-host'), new URL(listener.url).host)
  assert.equal(await res.text(), 'hello POST')
})

test('http.request with a Host header reaches the listener too', async () => {
  const port = env.relay.httpAddress().port
  const req = http.request({ host: '127.0.0.1', port, path: '/hello', headers: { host: new URL(listener.url).host } })
  req.end()
  const [res] = await within(STEP_MS, 'response', once(req, 'response'))
  assert.equal(res.statusCode, 201)
  assert.equal((await hashStream(res)).bytes, 'hello GET'.length)
})

test('fetch(): a 10 MiB streamed response body, hashed', async () => {
  const res = await undici.fetch(`${listener.url}/big`, { dispatcher })
  assert.equal(res.status, 200)
  const got = await within(60_000, '10 MiB download', hashStream(res.body))
  assert.deepEqual(got, { hash: sha256(BIG), bytes: BIG.length })
})

test('fetch(): a 10 MiB streamed request body, hashed by the server', async () => {
  async function * chunks () {
    for (let off = 0; off < BIG.length; off += 256 * 1024) yield BIG.subarray(off, off + 256 * 1024)
  }
  const res = await within(60_000, '10 MiB upload', undici.fetch(`${listener.url}/upload`, { method: 'PUT', body: chunks(), duplex: 'half', dispatcher }))
  assert.deepEqual(await res.json(), { hash: sha256(BIG), bytes: BIG.length })
})

test('server-sent events stream through', async () => {
  const res = await undici.fetch(`${listener.url}/sse`, { dispatcher, headers: { accept: 'text/event-stream' } })
  assert.equal(res.headers.get('content-type'), 'text/event-stream')
  const seen = []
  const decoder = new TextDecoder()
  let buf = ''
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk, { stream: true })
    let i
    while ((i = buf.indexOf('\n\n')) >= 0) {
      seen.push(buf.slice(0, i).split('\n').find((l) => l.startsWith('data: ')).slice(6))
      buf = buf.slice(i + 2)
    }
  }
  assert.deepEqual(seen, [0, 1, 2, 3, 4].map((n) => `event ${n}`))
})

test('a WebSocket upgrade passes through (ws on both ends)', async () => {
  const ws = new WebSocket(listener.url.replace(/^http/, 'ws') + '/socket', { lookup })
  await within(STEP_MS, 'websocket open', once(ws, 'open'))
  ws.send('ping')
  const [text] = await within(STEP_MS, 'text echo', once(ws, 'message'))
  assert.equal(text.toString(), 'echo: ping')
  const bin = payload(1 * MIB)
  ws.send(bin)
  const [back, isBinary] = await within(STEP_MS, 'binary echo', once(ws, 'message'))
  assert.equal(isBinary, true)
  assert.equal(sha256(back), sha256(bin))
  ws.close()
  await within(STEP_MS, 'websocket close', once(ws, 'close'))
})

test('500 concurrent requests through one listener, all correct', async () => {
  const agent = new http.Agent({ maxSockets: 500, lookup })
  const one = (i) => new Promise((resolve, reject) => {
    http.get(`${listener.url}/n/${i}`, { agent, lookup }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (d) => { body += d })
      res.on('end', () => resolve({ status: res.statusCode, body }))
    }).on('error', reject)
  })
  const results = await within(60_000, '500 requests', Promise.all(Array.from({ length: 500 }, (_, i) => one(i))))
  agent.destroy()
  results.forEach((r, i) => assert.deepEqual(r, { status: 200, body: String(i) }))
})
