'use strict'
// The relay's public HTTPS port from Node. A relay with its own wildcard certificate (its own CA,
// made here with the openssl CLI) terminates TLS for a `node:http` server behind a listener; an
// `https.Server` with its own certificate (another CA) behind `Listener.bind({ tlsPassthrough })`
// is reached undecrypted, so the client verifies the service's certificate and the relay's CA
// does not vouch for that name. Bodies are hashed; every wait is bounded.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const fs = require('node:fs')
const http = require('node:http')
const https = require('node:https')
const os = require('node:os')
const path = require('node:path')
const { execFileSync } = require('node:child_process')
const { Listener } = require('..')
const { startRelay, payload, sha256, within, generateListenerKey, STEP_MS } = require('./helpers')

const DOMAIN = 'test.example'

/** A CA and a leaf for `names` it signed, as PEM text: `{ ca, cert, key }` (openssl CLI). */
function makePki (dir, tag, names) {
  const f = (n) => path.join(dir, `${tag}-${n}`)
  const run = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', `/CN=libtunnel node test CA ${tag}`, '-keyout', f('ca.key'), '-out', f('ca.pem'))
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', `/CN=${names[0]}`,
    '-keyout', f('leaf.key'), '-out', f('leaf.csr'))
  fs.writeFileSync(f('ext.cnf'), `subjectAltName=${names.map((n) => `DNS:${n}`).join(',')}\n`)
  run('x509', '-req', '-in', f('leaf.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '2',
    '-extfile', f('ext.cnf'), '-out', f('leaf.pem'))
  return { ca: fs.readFileSync(f('ca.pem')), cert: fs.readFileSync(f('leaf.pem')), key: fs.readFileSync(f('leaf.key')), certFile: f('leaf.pem'), keyFile: f('leaf.key') }
}

/** One HTTPS request to the relay's HTTPS port for `host`: `{ status, body, peerCert }`. */
function request (port, host, ca, { method = 'GET', body } = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, servername: host, headers: { host }, ca, method, path: '/hash', agent: false }, (res) => {
      const chunks = []
      const peerCert = res.socket.getPeerCertificate()
      res.on('data', (c) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString(), peerCert }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(body)
  })
}

/** Answers every request with `TAG SHA256(body) LENGTH`. */
function hashHandler (tag) {
  return (req, res) => {
    const h = crypto.createHash('sha256')
    let n = 0
    req.on('data', (c) => { h.update(c); n += c.length })
    req.on('end', () => res.end(`${tag} ${h.digest('hex')} ${n}`))
  }
}

let dir, relayPki, servicePki, env, httpsPort, terminated, passthrough, plainServer, tlsServer

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'libtunnel-node-tls-'))
  relayPki = makePki(dir, 'relay', [`*.${DOMAIN}`, DOMAIN])
  env = await startRelay({ https_listen: '127.0.0.1:0', public_tls_cert: relayPki.certFile, public_tls_key: relayPki.keyFile, domain: DOMAIN })
  const line = env.relay.readyText.split('\n').find((l) => l.startsWith('public https listening: https://'))
  assert.ok(line, `no HTTPS port in the relay's ready text:\n${env.relay.readyText}`)
  httpsPort = Number(new URL(line.split(': ')[1]).port)

  terminated = await Listener.bind({ relay: env.url, key: generateListenerKey().pem })
  plainServer = terminated.serve(http.createServer(hashHandler('plain')))

  const passKey = generateListenerKey()
  servicePki = makePki(dir, 'service', [`${passKey.name}.${DOMAIN}`])
  passthrough = await Listener.bind({ relay: env.url, key: passKey.pem, tlsPassthrough: true })
  tlsServer = passthrough.serve(https.createServer({ cert: servicePki.cert, key: servicePki.key }, hashHandler('service')))
})

after(async () => {
  plainServer?.closeAllConnections?.()
  tlsServer?.closeAllConnections?.()
  plainServer?.close()
  tlsServer?.close()
  await terminated?.closed()
  await passthrough?.closed()
  await env?.relay.close()
  if (dir) fs.rmSync(dir, { recursive: true, force: true })
})

test('the relay terminates TLS with its certificate and a 4 MiB body reaches the http server behind a listener', async () => {
  const data = payload(4 * 1024 * 1024)
  const host = `${terminated.name}.${DOMAIN}`
  const res = await within(STEP_MS, 'the HTTPS request', request(httpsPort, host, relayPki.ca, { method: 'POST', body: data }))
  assert.equal(res.status, 200)
  assert.equal(res.body, `plain ${sha256(data)} ${data.length}`)
  assert.match(res.peerCert.subjectaltname, new RegExp(`DNS:\\*\\.${DOMAIN.replace('.', '\\.')}`))
})

test('tlsPassthrough: the client verifies the service\'s own certificate; the relay never decrypts', async () => {
  const host = `${passthrough.name}.${DOMAIN}`
  const data = payload(1024 * 1024)
  const res = await within(STEP_MS, 'the passthrough request', request(httpsPort, host, servicePki.ca, { method: 'POST', body: data }))
  assert.equal(res.status, 200)
  assert.equal(res.body, `service ${sha256(data)} ${data.length}`)
  assert.equal(res.peerCert.subjectaltname, `DNS:${host}`)
})

test('the relay\'s CA does not vouch for a passthrough name', async () => {
  const host = `${passthrough.name}.${DOMAIN}`
  const err = await within(STEP_MS, 'the refused handshake', request(httpsPort, host, relayPki.ca).then(
    () => { throw new Error('a client trusting only the relay\'s CA reached the passthrough service') },
    (e) => e))
  assert.match(err.code, /UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY|ERR_TLS_CERT_ALTNAME_INVALID/, `${err.code}: ${err.message}`)
})
