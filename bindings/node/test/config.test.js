'use strict'
// The client configuration every face shares (the core's `libtunnel::client`): the bad-input table
// of tests/fixtures/client_config_cases.json (the CLI, Python and C faces run the same table), and
// one `.env` holding the relay's and the clients' variables that starts `Server.start({ env: true })`
// and configures `Dialer.connect()` and `Listener.bind()` with no option at all.

const { test, beforeEach, afterEach } = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { Dialer, Listener, Server, generateKey, generateListenerKey, loadListenerKey } = require('..')
const { echoServer, payload, sha256, hashStream, within, STEP_MS } = require('./helpers')

const TABLE = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', '..', 'tests', 'fixtures', 'client_config_cases.json'), 'utf8'))

let dir, savedCwd, savedEnv

beforeEach(() => {
  // A working directory of its own and no inherited TUNNEL_* variables.
  savedCwd = process.cwd()
  savedEnv = { ...process.env }
  for (const k of Object.keys(process.env)) {
    if (/^(TUNNEL_|EMISSARY_|LIBTUNNEL_)/.test(k)) delete process.env[k]
  }
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'libtunnel-config-'))
  process.chdir(dir)
})

afterEach(() => {
  process.chdir(savedCwd)
  for (const k of Object.keys(process.env)) if (!(k in savedEnv)) delete process.env[k]
  Object.assign(process.env, savedEnv)
  fs.rmSync(dir, { recursive: true, force: true })
})

test('the shared bad-input table: same code, a message naming the fix, never the secret', async () => {
  const listenerKey = path.join(dir, 'listener.pem')
  generateListenerKey(listenerKey)
  const relay = 'ws://127.0.0.1:9' // nothing listens there, and no case may get as far as connecting
  for (const c of TABLE.cases) {
    const listener = c.role === 'listener'
    const key = c.key ?? (listener ? listenerKey : TABLE.good_key)
    // The table's timeouts are seconds; Node's option is milliseconds (the same bad values).
    const timeout = c.timeout !== undefined ? Number(c.timeout) * 1000 : undefined
    const attempt = listener ? Listener.bind({ relay, key, timeout }) : Dialer.connect({ relay, key, timeout })
    const err = await within(STEP_MS, c.name, attempt.then(() => null, (e) => e))
    assert.ok(err instanceof Error, `${c.name}: refused`)
    assert.equal(err.tunnelCode, c.code, `${c.name}: ${err.message}`)
    assert.equal(err.code, 'EINVAL', c.name)
    for (const n of c.names) assert.ok(err.message.includes(n), `${c.name}: ${JSON.stringify(err.message)} names ${n}`)
    assert.ok(!err.message.includes(TABLE.secret), `${c.name}: the secret leaked: ${err.message}`)
  }
})

test('missing values name the variables to set', async () => {
  const msg = async (p) => (await p.then(() => null, (e) => e)).message
  assert.match(await msg(Dialer.connect()), /TUNNEL_RELAY/)
  assert.match(await msg(Dialer.connect({ relay: 'ws://127.0.0.1:9' })), /TUNNEL_KEY/)
  assert.match(await msg(Listener.bind({ relay: 'ws://127.0.0.1:9' })), /TUNNEL_LISTENER_KEY/)
})

test('one .env serves the relay and the clients', async () => {
  const echo = await echoServer()
  const shared = generateKey(5)
  const listenerKey = path.join(dir, 'listener.pem')
  generateListenerKey(listenerKey)
  // Relay and client variables side by side, as in one compose file (the old worker-thread name
  // too: warned about, not refused).
  fs.writeFileSync(path.join(dir, '.env'), [
    'TUNNEL_LISTEN=127.0.0.1:0',
    `TUNNEL_AUTH_KEYS='${shared.authKeys}'`,
    `TUNNEL_ALLOW='[{"host":"127.0.0.1","port":${echo.address().port}}]'`,
    'TUNNEL_LISTENERS_OPEN=true',
    `TUNNEL_KEY=${shared.key}`,
    `TUNNEL_LISTENER_KEY=${listenerKey}`,
    'TUNNEL_CA=', 'TUNNEL_TIMEOUT=15', 'TUNNEL_MODE=multiplexed', 'TUNNEL_WORKER_THREADS=2', 'LIBTUNNEL_WORKER_THREADS=2', ''
  ].join('\n'))
  const relay = await Server.start({}, { env: true })
  try {
    // The relay's port is only known now: TUNNEL_RELAY comes from the process environment, which
    // wins over .env as for the relay.
    process.env.TUNNEL_RELAY = relay.url
    const dialer = await Dialer.connect()
    const data = payload(300_000)
    const socket = await dialer.dial(`127.0.0.1:${echo.address().port}`)
    socket.end(data)
    assert.deepEqual(await within(STEP_MS, 'echo', hashStream(socket)), { hash: sha256(data), bytes: data.length })
    await dialer.close()
    const listener = await Listener.bind()
    assert.equal(listener.name, loadListenerKey(listenerKey).name)
    listener.close()
    await listener.closed()
  } finally {
    echo.close()
    await relay.close()
  }
})
