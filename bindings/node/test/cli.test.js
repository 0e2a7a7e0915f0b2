'use strict'
// `npx libtunnel …` (bin/libtunnel.js) and examples/node, run as child processes.

const { test } = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const net = require('node:net')
const { execFile, spawn } = require('node:child_process')
const { once } = require('node:events')
const { promisify } = require('node:util')
const { within, echoServer } = require('./helpers')

const BIN = path.join(__dirname, '..', 'bin', 'libtunnel.js')
const EXAMPLE = path.join(__dirname, '..', '..', '..', 'examples', 'node', 'http-behind-relay.js')
const run = promisify(execFile)

/** Start `libtunnel ARGS`, resolve with the process and the first stdout line matching `re`. */
async function start (args, re, env = {}) {
  const proc = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] })
  let out = ''
  const line = new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => {
      out += d
      const m = re.exec(out)
      if (m) resolve(m)
    })
    proc.on('exit', (code) => reject(new Error(`libtunnel ${args[0]} exited (${code}): ${out}`)))
  })
  try {
    return { proc, match: await within(20_000, `libtunnel ${args[0]}`, line) }
  } catch (err) {
    proc.kill()
    throw err
  }
}

test('keygen prints a client key and the relay entry', async () => {
  const { stdout } = await run(process.execPath, [BIN, 'keygen', '--kid', '4'])
  assert.match(stdout, /^TUNNEL_KEY=4:[A-Za-z0-9+/]{43}=$/m)
  assert.match(stdout, /^TUNNEL_AUTH_KEYS='\[\{"kid":4,"data":"[A-Za-z0-9+/]{43}="\}\]'$/m)
})

test('a bad setting exits 2 with the error name', async () => {
  const err = await run(process.execPath, [BIN, 'server', '--set', 'listne=127.0.0.1:0']).then(() => null, (e) => e)
  assert.equal(err?.code, 2)
  assert.match(err.stderr, /^error \[INVALID_CONFIG\]: unknown .*listne.*did you mean listen/m)
})

test('server + forward: bytes reach the target; SIGTERM stops both', async (t) => {
  const echo = await echoServer()
  t.after(() => echo.close())
  const { stdout } = await run(process.execPath, [BIN, 'keygen'])
  const key = /^TUNNEL_KEY=(.*)$/m.exec(stdout)[1]
  const authKeys = /^TUNNEL_AUTH_KEYS='(.*)'$/m.exec(stdout)[1]
  const server = await start(['server', '--listen', '127.0.0.1:0', '--auth-keys', authKeys, '--allow', JSON.stringify([{ host: '127.0.0.1', port: echo.address().port }])], /relay listening: (\S+)/)
  t.after(() => server.proc.kill())
  const fwd = await start(['forward', '127.0.0.1:0', `127.0.0.1:${echo.address().port}`, '--relay', server.match[1]], /forwarding 127\.0\.0\.1:(\d+)/, { TUNNEL_KEY: key })
  t.after(() => fwd.proc.kill())
  const sock = net.connect(Number(fwd.match[1]), '127.0.0.1')
  sock.end('through the cli')
  let back = ''
  for await (const d of sock) back += d
  assert.equal(back, 'through the cli')
  for (const p of [fwd.proc, server.proc]) {
    p.kill('SIGTERM')
    const [code] = await within(10_000, 'exit after SIGTERM', once(p, 'exit'))
    assert.equal(code, 0)
  }
})

test('examples/node/http-behind-relay.js runs and exits on its own', async () => {
  const { stdout } = await within(30_000, 'the example', run(process.execPath, [EXAMPLE], { env: { ...process.env, TUNNEL_RELAY: '' } }))
  assert.match(stdout, /GET \/hi through the relay: 200 \{"hello":"from behind the relay"/)
  assert.match(stdout, /closed; the process exits on its own/)
})

test('the ESM entry point exports the same API', async () => {
  const entry = path.join(__dirname, '..', 'index.mjs')
  const code = `import lib, { Listener, Dialer, Server, setLogger, errorCodes } from ${JSON.stringify(entry)}
    console.log([Listener === lib.Listener, Dialer === lib.Dialer, Server === lib.Server, typeof setLogger, errorCodes.length].join(' '))`
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', code])
  assert.equal(stdout.trim(), `true true true function ${require('..').errorCodes.length}`)
})

test('server prints every address tunnel server prints, and stops when its parent (npx) is gone', async () => {
  const { stdout } = await run(process.execPath, [BIN, 'keygen'])
  const authKeys = /^TUNNEL_AUTH_KEYS='(.*)'$/m.exec(stdout)[1]
  // `sh` stands for npx, which does not forward SIGTERM: killing it orphans the relay.
  const args = ['server', '--listen', '127.0.0.1:0', '--auth-keys', authKeys, '--allow', '[{"host":"127.0.0.1","port":9}]', '--set', 'http_listen=127.0.0.1:0']
  const parent = spawn('sh', ['-c', `"${process.execPath}" "${BIN}" ${args.map((a) => `'${a}'`).join(' ')} & echo "pid=$!"; wait`], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  const printed = new Promise((resolve) => parent.stdout.on('data', (d) => { out += d; if (/public http listening: http:\/\/\S+\n/.test(out)) resolve() }))
  await within(20_000, 'the relay start lines', printed)
  assert.match(out, /^relay listening: ws:\/\/127\.0\.0\.1:\d+/m)
  assert.match(out, /^public http listening: http:\/\/127\.0\.0\.1:[1-9]\d*/m)
  const pid = Number(/^pid=(\d+)/m.exec(out)[1])
  parent.kill('SIGKILL')
  // The orphaned relay notices within a second or so, drains (nothing is open) and exits.
  // Gone, or a zombie nobody reaps (PID 1 of a container may not): either way it has exited.
  const alive = () => { try { return !/^\d+ \(.*\) Z/.test(require('node:fs').readFileSync(`/proc/${pid}/stat`, 'utf8')) } catch { return false } }
  try {
    await within(20_000, 'the orphaned relay to exit', (async () => {
      while (alive()) await new Promise((resolve) => setTimeout(resolve, 100))
    })())
  } finally {
    if (alive()) process.kill(pid, 'SIGKILL')
  }
})

test('the README snippet is examples/node/expose.js, and it runs as pasted', async (t) => {
  const fs = require('node:fs')
  const os = require('node:os')
  const { Server, generateKey, generateListenerKey } = require('..')
  const file = path.join(__dirname, '..', '..', '..', 'examples', 'node', 'expose.js')
  const code = fs.readFileSync(file, 'utf8')
  for (const readme of [path.join(__dirname, '..', '..', '..', 'README.md'), path.join(__dirname, '..', 'README.md')]) {
    const text = fs.readFileSync(readme, 'utf8')
    const m = /<!-- readme-test: same as examples\/node\/expose\.js -->\n( *)```js\n([\s\S]*?)\n\1```/.exec(text)
    assert.ok(m, `${readme} shows examples/node/expose.js`)
    const shown = m[2].split('\n').map((l) => l.slice(m[1].length)).join('\n') + '\n'
    assert.equal(shown, code, `${readme}'s snippet is the file, to the letter`)
  }
  // `require('libtunnel')` as a user has it: a node_modules/libtunnel that is this package.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'libtunnel-readme-'))
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }))
  fs.mkdirSync(path.join(dir, 'node_modules'))
  fs.symlinkSync(path.join(__dirname, '..'), path.join(dir, 'node_modules', 'libtunnel'), 'dir')
  const key = path.join(dir, 'listener.pem')
  generateListenerKey(key)
  const relay = await Server.start({ listen: '127.0.0.1:0', http_listen: '127.0.0.1:0', auth_keys: generateKey(1).authKeys, listeners_open: true, allow: [{ host: '127.0.0.1', port: 9 }] })
  t.after(() => relay.close())
  const env = { ...process.env, TUNNEL_RELAY: relay.url, TUNNEL_LISTENER_KEY: key, NODE_PATH: path.join(dir, 'node_modules') }
  const proc = spawn(process.execPath, [file], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  t.after(() => proc.kill())
  let err = ''
  proc.stderr.on('data', (d) => { err += d })
  const exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)))
  let out = ''
  const url = await within(20_000, 'the example to print its URL', new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => { out += d; const m = /reachable at (http:\/\/\S+)/.exec(out); if (m) resolve(m[1]) })
    proc.on('exit', (c) => reject(new Error(`the example exited (${c}): ${out}`)))
  }))
  const host = new URL(url).host
  const body = await within(10_000, 'a request through the relay', new Promise((resolve, reject) => {
    const req = require('node:http').request({ host: '127.0.0.1', port: relay.httpAddress().port, path: '/', headers: { host } }, (res) => {
      let b = ''
      res.on('data', (d) => { b += d }).on('end', () => resolve(b))
    })
    req.on('error', reject)
    req.end()
  }))
  assert.equal(body, 'hello from behind NAT\n')

  // A second process of the same key takes the name over: the first one's listener emits
  // 'error' (NAME_TAKEN) later, which the example reports as its code and exits 1 (no stack trace).
  const second = spawn(process.execPath, [file], { env, stdio: ['ignore', 'ignore', 'ignore'] })
  t.after(() => second.kill())
  const status = await within(20_000, 'the first example to stop once the name is taken', exited)
  assert.equal(status, 1, `exit code; stderr: ${err}`)
  assert.match(err, /^error \[NAME_TAKEN\]: .+\n$/, 'one line naming the code')
})

test('examples/node/http-behind-relay.js exits 0 with nothing on stderr, 20 runs out of 20', async () => {
  for (let i = 1; i <= 20; i++) {
    const proc = spawn(process.execPath, [EXAMPLE], { env: { ...process.env, TUNNEL_RELAY: '' }, stdio: ['ignore', 'pipe', 'pipe'] })
    let err = ''
    proc.stderr.on('data', (d) => { err += d })
    proc.stdout.resume()
    const [code] = await within(30_000, `run ${i} of the example`, once(proc, 'exit'))
    assert.equal(code, 0, `run ${i}: exit ${code}; stderr: ${err}`)
    assert.equal(err, '', `run ${i}: stderr`)
  }
})

test('the relay\'s log lines start with a timestamp, as the Rust CLI\'s do', async () => {
  // A broad allow rule makes the relay log, at start, what that rule leaves out.
  const { stdout } = await run(process.execPath, [BIN, 'keygen'])
  const authKeys = /^TUNNEL_AUTH_KEYS='(.*)'$/m.exec(stdout)[1]
  const proc = spawn(process.execPath, [BIN, 'server', '--listen', '127.0.0.1:0', '--auth-keys', authKeys, '--allow', JSON.stringify([{ host: '0.0.0.0/0', port: 80 }])], { stdio: ['ignore', 'ignore', 'pipe'] })
  try {
    let err = ''
    const line = await within(20_000, 'a log line on stderr', new Promise((resolve, reject) => {
      proc.stderr.on('data', (d) => {
        err += d
        if (err.includes('\n')) resolve(err.split('\n')[0])
      })
      proc.on('exit', (code) => reject(new Error(`the relay exited (${code}): ${err}`)))
    }))
    assert.match(line, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z +(INFO|WARN) libtunnel/)
  } finally {
    proc.kill()
  }
})
