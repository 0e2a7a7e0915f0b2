'use strict'
// Every failure reaches JS as an Error whose `code` comes from the core's table.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { Dialer, Listener, Server, errorCodes, generateKey, generateListenerKey } = require('..')
const { startRelay, rejection, within, STEP_MS } = require('./helpers')

let env, granted

before(async () => {
  granted = generateListenerKey()
  env = await startRelay({ listener_keys: [{ public_key: granted.publicKey, names: ['api'] }] })
})

after(async () => env?.relay.close())

function assertCode (err, code, tunnelCode) {
  assert.ok(err instanceof Error, `expected an Error, got ${err}`)
  assert.equal(err.code, code, `${err.message}`)
  assert.equal(err.tunnelCode, tunnelCode)
  assert.ok(err.message.length > 0)
}

test('the error table is the core one', () => {
  assert.equal(errorCodes.length, 17)
  assert.deepEqual(errorCodes[3], { number: 4, name: 'NOT_ALLOWED', code: 'ENOTALLOWED', final: true })
  assert.deepEqual(errorCodes[8], { number: 9, name: 'RELAY_UNAVAILABLE', code: 'ERELAYUNAVAILABLE', final: false })
  assert.deepEqual(errorCodes[15], { number: 16, name: 'E2E_IDENTITY', code: 'EE2EIDENTITY', final: true })
  assert.deepEqual(errorCodes[16], { number: 17, name: 'E2E_REFUSED', code: 'EE2EREFUSED', final: true })
})

test('wrong key: EAUTH', async () => {
  const wrong = generateKey(7).key // same key id, other secret
  const err = await rejection(Dialer.connect({ relay: env.url, key: wrong }), 'connect with a wrong key')
  assertCode(err, 'EAUTH', 'AUTH_FAILED')
})

test('unknown key id: EAUTHKEY', async () => {
  const err = await rejection(Dialer.connect({ relay: env.url, key: generateKey(99).key }), 'connect with an unknown key id')
  assertCode(err, 'EAUTHKEY', 'AUTH_UNKNOWN_KEY')
})

test('disallowed target: ENOTALLOWED', async () => {
  const dialer = await Dialer.connect({ relay: env.url, key: env.key })
  try {
    const err = await rejection(dialer.dial('10.1.2.3:5432'), 'dial outside the allowlist')
    assertCode(err, 'ENOTALLOWED', 'NOT_ALLOWED')
  } finally {
    await dialer.close()
  }
})

test('relay down: ERELAYUNAVAILABLE, for dialers and listeners', async () => {
  const probe = net.createServer()
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve))
  const port = probe.address().port
  await new Promise((resolve) => probe.close(resolve))
  const url = `ws://127.0.0.1:${port}`
  assertCode(await rejection(Dialer.connect({ relay: url, key: env.key }), 'connect to a dead relay'), 'ERELAYUNAVAILABLE', 'RELAY_UNAVAILABLE')
  assertCode(await rejection(Listener.bind({ relay: url, key: generateListenerKey().pem }), 'bind to a dead relay'), 'ERELAYUNAVAILABLE', 'RELAY_UNAVAILABLE')
})

test('listener name taken: ENAMETAKEN', async () => {
  const owner = await Listener.bind({ relay: env.url, key: granted.pem, name: 'api' })
  try {
    assert.equal(owner.name, 'api')
    const err = await rejection(Listener.bind({ relay: env.url, key: generateListenerKey().pem, name: 'api' }), 'bind a name held by another key')
    assertCode(err, 'ENAMETAKEN', 'NAME_TAKEN')
  } finally {
    owner.close()
    await within(STEP_MS, 'listener close', owner.closed())
  }
})

test('bad arguments and config: EINVAL, EINVALIDCONFIG', async () => {
  assertCode(await rejection(Dialer.connect({ relay: env.url, key: 'not-a-key' }), 'malformed key'), 'EINVAL', 'INVALID_ARGUMENT')
  assertCode(await rejection(Server.start({ listen: '127.0.0.1:0', allow: [{ host: '127.0.0.1', port: 9 }] }), 'relay without keys'), 'EINVALIDCONFIG', 'INVALID_CONFIG')
  assertCode(await rejection(Server.start({ listne: '127.0.0.1:0' }), 'unknown setting'), 'EINVALIDCONFIG', 'INVALID_CONFIG')
})
