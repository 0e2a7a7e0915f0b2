'use strict'
// Upstream proxies from Node: a real squid (HTTP CONNECT with Basic auth) between the client and
// the relay. A Listener and a Dialer given `proxy` (and a Dialer given only TUNNEL_PROXY) reach
// the relay through it, one CONNECT per session in squid's access log; a wrong password is an
// EAUTH / AUTH_FAILED error that never shows the password. As root, a Listener in a network
// namespace whose only way out is squid registers through it and serves a dialer outside.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const net = require('node:net')
const { once } = require('node:events')
const { spawn, execFileSync, spawnSync } = require('node:child_process')
const { Dialer, Listener } = require('..')
const { startRelay, echoServer, payload, sha256, hashStream, within, rejection, generateListenerKey, STEP_MS } = require('./helpers')

const PASSWORD = 's3cret-node'
const MIB = 1024 * 1024
let env, echo, squid

/** squid on a free loopback port with Basic auth (alice / PASSWORD): `{ port, url(pw), connects(n), stop }`. */
async function startSquid (ip = '127.0.0.1') {
  const exe = ['/usr/sbin/squid', '/usr/bin/squid', '/sbin/squid'].find((p) => fs.existsSync(p))
  if (!exe) {
    const why = 'squid not installed (apt-get install squid; scripts/test-node.sh does)'
    if (process.env.CI) throw new Error(why)
    // scripts/test.sh lists every skip in its summary.
    if (process.env.LIBTUNNEL_SKIP_LOG) fs.appendFileSync(process.env.LIBTUNNEL_SKIP_LOG, `node proxy tests skipped: ${why}\n`)
    return { skip: why }
  }
  // squid drops root for its `proxy` user, which must write here and read the password file.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'libtunnel-squid-'))
  fs.chmodSync(dir, 0o777)
  const hashed = execFileSync('openssl', ['passwd', '-apr1', PASSWORD], { encoding: 'utf8' }).trim()
  fs.writeFileSync(path.join(dir, 'passwd'), `alice:${hashed}\n`)
  const probe = net.createServer()
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve))
  const port = probe.address().port
  await new Promise((resolve) => probe.close(resolve))
  fs.writeFileSync(path.join(dir, 'squid.conf'), [
    `http_port ${ip}:${port}`, `pid_filename ${dir}/squid.pid`, `access_log stdio:${dir}/access.log`,
    `cache_log ${dir}/cache.log`, 'cache_store_log none', `coredump_dir ${dir}`, 'cache deny all',
    'shutdown_lifetime 0 seconds', 'pinger_enable off',
    `auth_param basic program /usr/lib/squid/basic_ncsa_auth ${dir}/passwd`,
    'acl authed proxy_auth REQUIRED', 'http_access allow authed', 'http_access deny all', ''
  ].join('\n'))
  // Its own service name: squid names its shared-memory segments after it.
  const service = `ltnode${process.pid}p${port}`
  const child = spawn(exe, ['-N', '-d', '1', '-n', service, '-f', path.join(dir, 'squid.conf')], { stdio: ['ignore', 'ignore', 'pipe'] })
  let err = ''
  const ready = new Promise((resolve, reject) => {
    child.stderr.on('data', (chunk) => {
      err += chunk
      if (err.includes('Accepting HTTP Socket')) resolve()
    })
    child.on('exit', (code) => reject(new Error(`squid exited (${code}): ${err}`)))
  })
  await within(30_000, 'squid start', ready)
  // squid logs that line before its listen() has run: wait until a connection is accepted.
  await within(STEP_MS, 'squid listening', (async () => {
    for (;;) {
      const ok = await new Promise((resolve) => {
        const s = net.connect(port, ip, () => resolve(true)).on('error', () => resolve(false))
        s.once('connect', () => s.destroy())
      })
      if (ok) return
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  })())
  const accessLog = path.join(dir, 'access.log')
  const lines = () => (fs.existsSync(accessLog) ? fs.readFileSync(accessLog, 'utf8').split('\n').filter((l) => l.includes(' CONNECT ')) : [])
  return {
    port,
    url: (pw = PASSWORD) => `http://alice:${pw}@${ip}:${port}`,
    /** The CONNECT lines, once there are `n` (squid logs a session when it ends), within STEP_MS. */
    async connects (n) {
      const deadline = Date.now() + STEP_MS
      while (lines().length < n && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
      return lines()
    },
    stop () {
      child.kill('SIGKILL')
      for (const f of fs.readdirSync('/dev/shm')) if (f.startsWith(`${service}-`)) fs.rmSync(path.join('/dev/shm', f), { force: true })
      fs.rmSync(dir, { recursive: true, force: true })
    }
  }
}

before(async () => {
  squid = await startSquid()
  echo = await echoServer()
  env = await startRelay({ allow: [{ host: '127.0.0.1', port: echo.address().port }] })
})

after(async () => {
  squid?.stop?.()
  echo?.close()
  await env?.relay.close()
})

async function echoMiB (dialer) {
  const data = payload(MIB)
  const socket = await dialer.dial(`127.0.0.1:${echo.address().port}`)
  const send = async () => {
    if (!socket.write(data)) await once(socket, 'drain')
    socket.end()
  }
  const [got] = await within(STEP_MS, '1 MiB echo through squid', Promise.all([hashStream(socket), send()]))
  assert.deepEqual(got, { hash: sha256(data), bytes: data.length })
  socket.destroy()
}

test('a Listener and Dialers reach the relay through squid (proxy option and TUNNEL_PROXY)', async (t) => {
  if (squid.skip) return t.skip(squid.skip)
  const before = (await squid.connects(0)).length
  // A listener registered through the proxy; a dialer that bypasses it reaches it by name.
  const listener = await Listener.bind({ relay: env.url, key: generateListenerKey().pem, proxy: squid.url(), allowHalfOpen: true })
  listener.on('connection', (socket) => hashStream(socket).then(({ hash }) => socket.end(hash)))
  const direct = await Dialer.connect({ relay: env.url, key: env.key, proxy: 'none' })
  try {
    const socket = await direct.dial(`${listener.name}:0`)
    const data = payload(MIB)
    const reply = async () => {
      let text = ''
      for await (const chunk of socket) text += chunk
      return text
    }
    const send = async () => {
      if (!socket.write(data)) await once(socket, 'drain')
      socket.end()
    }
    const [text] = await within(STEP_MS, 'hash reply from the proxied listener', Promise.all([reply(), send()]))
    assert.equal(text, sha256(data))
  } finally {
    await direct.close()
    listener.close()
    await within(STEP_MS, 'listener close', listener.closed())
  }
  // A dialer with the proxy option, then one with only TUNNEL_PROXY (read by the core).
  const viaOption = await Dialer.connect({ relay: env.url, key: env.key, proxy: squid.url() })
  await echoMiB(viaOption)
  await viaOption.close()
  process.env.TUNNEL_PROXY = squid.url()
  try {
    const viaEnv = await Dialer.connect({ relay: env.url, key: env.key })
    await echoMiB(viaEnv)
    await viaEnv.close()
  } finally {
    delete process.env.TUNNEL_PROXY
  }
  const lines = await squid.connects(before + 3)
  assert.equal(lines.length, before + 3, lines.join('\n'))
  assert.ok(lines.every((l) => l.includes(' alice ')), lines.join('\n'))
})

test('a wrong proxy password: EAUTH / AUTH_FAILED, the password never shown', async (t) => {
  if (squid.skip) return t.skip(squid.skip)
  const err = await rejection(Dialer.connect({ relay: env.url, key: env.key, proxy: squid.url('hunter2') }), 'dial with a wrong proxy password')
  assert.equal(err.code, 'EAUTH', err.message)
  assert.equal(err.tunnelCode, 'AUTH_FAILED')
  assert.ok(err.message.includes(`alice:***@127.0.0.1:${squid.port}`) && err.message.includes('407'), err.message)
  assert.ok(!err.message.includes('hunter2') && !String(err.stack).includes('hunter2'), err.message)
  const lerr = await rejection(Listener.bind({ relay: env.url, key: generateListenerKey().pem, proxy: squid.url('hunter2') }), 'bind with a wrong proxy password')
  assert.equal(lerr.tunnelCode, 'AUTH_FAILED', lerr.message)
  assert.ok(!lerr.message.includes('hunter2'), lerr.message)
})

// Run inside the namespace: a Listener through the proxy that answers each stream with the hash
// of what it read.
const INSIDE = `
const crypto = require('node:crypto')
const { Listener } = require(process.argv[1])
const [relay, key, proxy] = process.argv.slice(2)
Listener.bind({ relay, key, proxy, allowHalfOpen: true }).then((l) => {
  l.on('connection', async (s) => {
    const h = crypto.createHash('sha256')
    for await (const c of s.iterator({ destroyOnReturn: false })) h.update(c)
    s.end(h.digest('hex'))
  })
  console.log('listening as: ' + l.name)
}, (e) => { console.error(e.message); process.exit(1) })
`

test('a Listener in a network namespace whose only way out is squid', async (t) => {
  if (process.getuid() !== 0 || ['unshare', 'nsenter', 'ip'].some((c) => spawnSync('which', [c]).status !== 0)) {
    const why = 'the namespace test needs root, unshare, nsenter and ip (util-linux, iproute2)'
    if (process.env.CI) throw new Error(why)
    if (process.env.LIBTUNNEL_SKIP_LOG) fs.appendFileSync(process.env.LIBTUNNEL_SKIP_LOG, `node proxy test skipped: ${why}\n`)
    return t.skip(why)
  }
  if (squid.skip) return t.skip(squid.skip)
  const ns = spawn('unshare', ['-n', '--', 'sleep', '600'], { stdio: 'ignore' })
  const outside = `ndo${ns.pid % 100000}`
  const inside = `ndi${ns.pid % 100000}`
  t.after(() => {
    ns.kill('SIGKILL')
    spawnSync('ip', ['link', 'del', outside])
  })
  const own = fs.readlinkSync('/proc/self/ns/net')
  await within(STEP_MS, 'unshare -n', (async () => {
    while (fs.readlinkSync(`/proc/${ns.pid}/ns/net`) === own) await new Promise((resolve) => setTimeout(resolve, 5))
  })())
  const net4 = `10.215.${ns.pid % 250}.`
  const inns = ['nsenter', '-t', String(ns.pid), '-n', '--']
  for (const cmd of [
    ['ip', 'link', 'add', outside, 'type', 'veth', 'peer', 'name', inside, 'netns', String(ns.pid)],
    ['ip', 'addr', 'add', `${net4}1/30`, 'dev', outside],
    ['ip', 'link', 'set', outside, 'up'],
    [...inns, 'ip', 'addr', 'add', `${net4}2/30`, 'dev', inside],
    [...inns, 'ip', 'link', 'set', inside, 'up'],
    [...inns, 'ip', 'link', 'set', 'lo', 'up']
  ]) execFileSync(cmd[0], cmd.slice(1))
  const proxy = await startSquid(`${net4}1`)
  t.after(() => proxy.stop())
  const child = spawn(inns[0], [...inns.slice(1), process.execPath, '-e', INSIDE, path.join(__dirname, '..'), env.url, generateListenerKey().pem, proxy.url()],
    { stdio: ['ignore', 'pipe', 'pipe'] })
  t.after(() => child.kill('SIGKILL'))
  let out = ''
  let err = ''
  child.stderr.on('data', (c) => { err += c })
  const name = await within(STEP_MS, 'the listener in the namespace', new Promise((resolve, reject) => {
    child.stdout.on('data', (c) => {
      out += c
      const m = out.match(/listening as: (\S+)\n/)
      if (m) resolve(m[1])
    })
    child.on('exit', (code) => reject(new Error(`the listener exited (${code}): ${err}`)))
  }))
  const direct = await Dialer.connect({ relay: env.url, key: env.key, proxy: 'none' })
  try {
    const socket = await direct.dial(`${name}:0`)
    const data = payload(MIB)
    const reply = async () => {
      let text = ''
      for await (const chunk of socket) text += chunk
      return text
    }
    const send = async () => {
      if (!socket.write(data)) await once(socket, 'drain')
      socket.end()
    }
    const [text] = await within(STEP_MS, 'hash reply from the listener in the namespace', Promise.all([reply(), send()]))
    assert.equal(text, sha256(data))
  } finally {
    await direct.close()
  }
  child.kill('SIGKILL')
  const lines = await proxy.connects(1)
  assert.equal(lines.length, 1, lines.join('\n'))
  assert.ok(!err.includes(PASSWORD), err)
})
