'use strict'
// Process lifetime, checked in child processes: an open listener keeps Node alive; once the
// listener, dialer and relay are closed the process exits on its own within a second. Also: Rust
// logs reach a JS callback without keeping the process alive.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { once } = require('node:events')
const { within } = require('./helpers')

const LIB = path.join(__dirname, '..')

/** Run `code` in a child node; resolves with { child, lines } once it prints `ready`. */
async function child (code) {
  const proc = spawn(process.execPath, ['-e', code], { env: { ...process.env, LIBTUNNEL: LIB }, stdio: ['pipe', 'pipe', 'inherit'] })
  const lines = []
  let buf = ''
  const ready = new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => {
      buf += d
      let i
      while ((i = buf.indexOf('\n')) >= 0) {
        lines.push(buf.slice(0, i))
        if (buf.slice(0, i) === 'ready') resolve()
        buf = buf.slice(i + 1)
      }
    })
    proc.on('exit', (code) => reject(new Error(`child exited (${code}) before ready: ${lines.join(' | ')}`)))
  })
  try {
    await within(20_000, 'child ready', ready)
  } catch (err) {
    proc.kill()
    throw err
  }
  return { proc, lines }
}

const SETUP = `
  const http = require('node:http')
  const net = require('node:net')
  const { Server, Listener, Dialer, generateKey, generateListenerKey, setLogger } = require(process.env.LIBTUNNEL)
  async function setup () {
    const k = generateKey(1)
    const echo = net.createServer((s) => s.pipe(s))
    await new Promise((r) => echo.listen(0, '127.0.0.1', r))
    const relay = await Server.start({ listen: '127.0.0.1:0', http_listen: '127.0.0.1:0', auth_keys: k.authKeys,
      allow: [{ host: '127.0.0.1', port: echo.address().port }], listeners_open: true, drain_timeout: 1 })
    const listener = await Listener.bind({ relay: relay.url, key: generateListenerKey().pem })
    const server = listener.serve(http.createServer((req, res) => res.end('ok')))
    const dialer = await Dialer.connect({ relay: relay.url, key: k.key })
    const sock = await dialer.dial('127.0.0.1:' + echo.address().port)
    sock.end('x')
    for await (const _ of sock) {}
    return { relay, listener, server, dialer, echo }
  }
`

test('an open listener keeps the process alive; closing everything lets it exit within a second', async (t) => {
  const { proc } = await child(SETUP + `
    setup().then((all) => {
      console.log('ready')
      process.stdin.once('data', async () => {
        process.stdin.destroy()
        all.server.close()
        all.echo.close()
        await all.dialer.close()
        await all.listener.closed()
        await all.relay.close()
        console.log('closed')
      })
    })
  `)
  t.after(() => proc.kill())
  // Nothing is pending in JS but the listener: the child must still be running a while later.
  const early = once(proc, 'exit')
  const outcome = await Promise.race([early.then(() => 'exited'), new Promise((resolve) => setTimeout(resolve, 1500, 'alive'))])
  assert.equal(outcome, 'alive', 'the process exited while a listener was open')
  const closed = new Promise((resolve) => proc.stdout.on('data', (d) => String(d).includes('closed') && resolve(Date.now())))
  proc.stdin.write('close\n')
  const closedAt = await within(10_000, 'closing everything', closed)
  const [code] = await within(5_000, 'process exit', early)
  assert.equal(code, 0)
  assert.ok(Date.now() - closedAt < 1000, `exited ${Date.now() - closedAt} ms after closing`)
})

test('logs reach a JS callback, and the callback does not keep the process alive', async (t) => {
  const { proc, lines } = await child(SETUP + `
    const seen = []
    setLogger((level, target, message) => seen.push(level + ' ' + target + ' ' + message), 'libtunnel=debug')
    setup().then(async (all) => {
      console.log('ready')
      all.server.close()
      all.echo.close()
      await all.dialer.close()
      await all.listener.closed()
      await all.relay.close()
      setImmediate(() => console.log(JSON.stringify(seen)))
    })
  `)
  t.after(() => proc.kill())
  // 'close' rather than 'exit': it comes after the child's stdout has been read to the end.
  const [code] = await within(5_000, 'process exit', once(proc, 'close'))
  assert.equal(code, 0)
  const seen = JSON.parse(lines.at(-1))
  assert.ok(seen.some((l) => /^info libtunnel::relay tunnel endpoint listening/.test(l)), seen.join('\n'))
  assert.ok(seen.some((l) => l.startsWith('debug ')), 'debug events pass the libtunnel=debug filter')
})
