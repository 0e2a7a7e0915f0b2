'use strict'
// The QUIC transport from Node, with no new API: an embedded relay with `quic_listen` (and
// `tls_cert`/`tls_key`, a certificate for localhost from a test CA made with the openssl CLI),
// its `quic listening:` line read from `readyText`; a Dialer on the `quic://` URL with `ca`
// echoing 8 MiB hashed both ways with half-close; a Listener bound over `quic://` answering the
// hash of 4 MiB dialed by name (through the relay's `wss://` URL, and over `quic://`: the relay
// joins two QUIC streams); a wrong key (EAUTHFAILED), a denied target
// (ENOTALLOWED), no `ca` (the certificate refused), and `classic` refused (EINVALIDARGUMENT).

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { execFileSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { once } = require('node:events')
const { Dialer, Listener } = require('..')
const { startRelay, echoServer, payload, sha256, hashStream, within, rejection, generateListenerKey, STEP_MS } = require('./helpers')

const MIB = 1024 * 1024
let env, echo, dir, quicUrl, wssUrl, ca

/** A CA and a leaf for localhost and 127.0.0.1 it signed (openssl CLI): file paths. */
function makePki () {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'libtunnel-quic-'))
  const f = (name) => path.join(d, name)
  const run = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', f('ca.key'), '-out', f('ca.pem'),
    '-days', '2', '-subj', '/CN=libtunnel quic test CA')
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', f('leaf.key'), '-out', f('leaf.csr'), '-subj', '/CN=localhost')
  fs.writeFileSync(f('ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n')
  run('x509', '-req', '-in', f('leaf.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '2', '-extfile', f('ext'), '-out', f('leaf.pem'))
  return { dir: d, ca: f('ca.pem'), cert: f('leaf.pem'), key: f('leaf.key') }
}

before(async () => {
  echo = await echoServer()
  const pki = makePki()
  dir = pki.dir
  ca = pki.ca
  env = await startRelay({
    allow: [{ host: '127.0.0.1', port: echo.address().port }],
    quic_listen: '127.0.0.1:0',
    tls_cert: pki.cert,
    tls_key: pki.key
  })
  const line = env.relay.readyText.split('\n').find((l) => l.startsWith('quic listening: quic://127.0.0.1:'))
  assert.ok(line, `the ready lines name the QUIC endpoint: ${env.relay.readyText}`)
  const port = Number(line.split(':').pop())
  assert.ok(port > 0)
  quicUrl = `quic://localhost:${port}`
  assert.match(env.url, /^wss:\/\/127\.0\.0\.1:/)
  wssUrl = env.url.replace('127.0.0.1', 'localhost')
})

after(async () => {
  echo?.close()
  await env?.relay.close()
  if (dir) fs.rmSync(dir, { recursive: true, force: true })
})

/** Write `data` to `socket` in pieces with backpressure, then half-close. */
async function sendAndEnd (socket, data) {
  for (let off = 0; off < data.length; off += 1 * MIB) {
    if (!socket.write(data.subarray(off, off + 1 * MIB))) await once(socket, 'drain')
  }
  socket.end()
}

test('a Dialer over quic:// echoes 8 MiB hashed both ways, half-closed with socket.end()', async () => {
  const dialer = await Dialer.connect({ relay: quicUrl, key: env.key, ca })
  try {
    assert.equal(dialer.relay, quicUrl)
    const data = payload(8 * MIB)
    const socket = await dialer.dial(`127.0.0.1:${echo.address().port}`)
    const [got] = await within(60_000, '8 MiB echo over quic://', Promise.all([hashStream(socket), sendAndEnd(socket, data)]))
    assert.deepEqual(got, { hash: sha256(data), bytes: data.length })
    socket.destroy()
  } finally {
    await dialer.close()
  }
})

for (const over of ['wss', 'quic']) {
  test(`a Listener over quic:// is dialed by name over ${over}://: bytes both ways and half-close`, async (t) => {
    const listener = await Listener.bind({ relay: quicUrl, key: generateListenerKey().pem, ca, allowHalfOpen: true })
    t.after(() => listener.close())
    listener.on('connection', (socket, peer) => {
      assert.equal(peer.via, 'dial')
      // Answer with the hash of everything received, after the dialer's FIN.
      hashStream(socket).then(({ hash }) => socket.end(hash))
    })
    const dialer = await Dialer.connect({ relay: over === 'wss' ? wssUrl : quicUrl, key: env.key, ca })
    try {
      const socket = await dialer.dial(`${listener.name}:0`)
      const data = payload(4 * MIB)
      const reply = async () => {
        let text = ''
        for await (const chunk of socket) text += chunk
        return text
      }
      const [text] = await within(STEP_MS * 3, 'hash reply', Promise.all([reply(), sendAndEnd(socket, data)]))
      assert.equal(text, sha256(data))
    } finally {
      await dialer.close()
    }
    listener.close()
    await within(STEP_MS, 'listener close', listener.closed())
  })
}

test('refusals over quic:// carry their codes', async () => {
  const target = `127.0.0.1:${echo.address().port}`
  const wrong = await Dialer.connect({ relay: quicUrl, key: `${env.key.split(':')[0]}:bm90LXRoZS1yaWdodC1zZWNyZXQtMDEyMzQ1Njc4OQ==`, ca }).catch((e) => e)
  const auth = wrong instanceof Dialer ? await rejection(wrong.dial(target), 'dial with a wrong key') : wrong
  if (wrong instanceof Dialer) await wrong.close()
  assert.equal(auth.tunnelCode, 'AUTH_FAILED', auth.message)
  assert.equal(auth.code, 'EAUTH')

  const dialer = await Dialer.connect({ relay: quicUrl, key: env.key, ca })
  try {
    const denied = await rejection(dialer.dial('127.0.0.1:9'), 'dial a denied target')
    assert.equal(denied.tunnelCode, 'NOT_ALLOWED', denied.message)
  } finally {
    await dialer.close()
  }

  const untrusting = await rejection(Dialer.connect({ relay: quicUrl, key: env.key }).then((d) => d.dial(target)), 'dial without ca')
  assert.match(untrusting.message, /certificate/)

  const classic = await rejection(Dialer.connect({ relay: quicUrl, key: env.key, ca, classic: true }).then((d) => d.dial(target)), 'classic over quic://')
  assert.equal(classic.tunnelCode, 'INVALID_ARGUMENT', classic.message)
  assert.match(classic.message, /ws:\/\//)
})
