'use strict'
// End-to-end encryption: an `e2e` listener admitting one dialer key (`allowPeers`), an `e2e`
// dialer presenting it (`e2eIdentity`), 8 MiB by name both ways, hashed, half-closed with
// socket.end(); the peer names the dialer; a keyless dialer is refused with EE2EREFUSED and an
// unpinned chosen name with EE2EIDENTITY.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const { once } = require('node:events')
const { Dialer, Listener } = require('..')
const { startRelay, payload, sha256, hashStream, within, rejection, generateListenerKey, STEP_MS } = require('./helpers')

const MIB = 1024 * 1024
let env

before(async () => { env = await startRelay() })
after(async () => { await env?.relay.close() })

async function sendAndEnd (socket, data) {
  for (let off = 0; off < data.length; off += MIB) {
    if (!socket.write(data.subarray(off, off + MIB))) await once(socket, 'drain')
  }
  socket.end()
}

test('e2e dial by name: 8 MiB each way hashed, dialer named; keyless and unpinned dials refused', async (t) => {
  const me = generateListenerKey()
  const listener = await Listener.bind({ relay: env.url, key: generateListenerKey().pem, e2e: true, allowPeers: [me.publicKey], allowHalfOpen: true })
  t.after(() => listener.close())
  const up = payload(8 * MIB)
  const down = payload(8 * MIB)
  const served = new Promise((resolve) => {
    listener.once('connection', (socket, peer) => {
      const read = hashStream(socket)
      sendAndEnd(socket, down).then(() => read).then((got) => resolve({ got, peer }))
    })
  })
  const dialer = await Dialer.connect({ relay: env.url, key: env.key, e2e: true, e2eIdentity: { pem: me.pem } })
  t.after(() => dialer.close())
  const socket = await dialer.dial(`${listener.name}:0`)
  const [got] = await within(60_000, 'e2e exchange', Promise.all([hashStream(socket), sendAndEnd(socket, up)]))
  assert.deepEqual(got, { hash: sha256(down), bytes: down.length }, 'the dialer read the listener side intact')
  const side = await within(STEP_MS, 'listener side', served)
  assert.deepEqual(side.got, { hash: sha256(up), bytes: up.length }, 'the listener side read plaintext, intact')
  assert.equal(side.peer.e2e, true)
  assert.equal(side.peer.dialerName, me.name)

  const keyless = await Dialer.connect({ relay: env.url, key: env.key, e2e: true })
  t.after(() => keyless.close())
  const refused = await rejection(keyless.dial(`${listener.name}:0`), 'keyless e2e dial')
  assert.equal(refused.code, 'EE2EREFUSED')
  assert.equal(refused.tunnelCode, 'E2E_REFUSED')
  assert.match(refused.message, /identity/)
  const unpinned = await rejection(keyless.dial('api:0'), 'unpinned chosen name')
  assert.equal(unpinned.code, 'EE2EIDENTITY')
  assert.match(unpinned.message, /--e2e-pin api=/)
})
