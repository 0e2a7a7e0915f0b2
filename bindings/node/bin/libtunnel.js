#!/usr/bin/env node
'use strict'
// `npx libtunnel …`: the `tunnel` command line (server, forward, socks, dial, listen, keygen,
// demo) through the Node bindings. Same options and environment variables as `tunnel`; errors
// print `error [NAME]: message` and exit 2 for config/argument errors, 1 otherwise.

const net = require('node:net')
const { parseArgs } = require('node:util')
const lib = require('..')
const native = require('../native.js')

const USAGE = `usage: libtunnel <command> [options]

  server  [--listen ADDR] [--tcp-listen ADDR] [--auth-keys JSON] [--allow JSON]
          [--tls-cert FILE] [--tls-key FILE] [--set NAME=VALUE]... [--config FILE]
  forward LOCAL TARGET   --relay URL --key KEY    local port forward (like ssh -L)
  socks   [--listen ADDR] --relay URL --key KEY   local SOCKS5 proxy
  dial    TARGET         --relay URL --key KEY    stdin/stdout to a target
  listen  --to LOCAL --relay URL --key FILE [--name NAME] [--tcp-port]
  keygen  [--kid N] | --listener --out FILE
  demo

Client options not given are read from TUNNEL_RELAY, TUNNEL_KEY (listen: TUNNEL_LISTENER_KEY),
TUNNEL_CA, TUNNEL_TIMEOUT and TUNNEL_MODE, in the environment or ./.env (as in every face);
--classic, --ca FILE and --timeout SECS work as in \`tunnel\`. RUST_LOG sets the log filter.`

const CLIENT = {
  relay: { type: 'string' },
  key: { type: 'string' },
  classic: { type: 'boolean' },
  ca: { type: 'string' },
  timeout: { type: 'string' }
}
const COMMANDS = {
  server: { listen: { type: 'string' }, 'tcp-listen': { type: 'string' }, 'auth-keys': { type: 'string' }, allow: { type: 'string' }, 'tls-cert': { type: 'string' }, 'tls-key': { type: 'string' }, set: { type: 'string', multiple: true }, config: { type: 'string' } },
  forward: CLIENT,
  socks: { ...CLIENT, listen: { type: 'string', default: '127.0.0.1:1080' } },
  dial: CLIENT,
  listen: { to: { type: 'string' }, relay: { type: 'string' }, key: { type: 'string' }, name: { type: 'string' }, 'tcp-port': { type: 'boolean' }, ca: { type: 'string' } },
  keygen: { kid: { type: 'string', default: '1' }, listener: { type: 'boolean' }, out: { type: 'string' } },
  demo: {}
}

// The parent at start: read before anything slow, so a parent that dies while the relay starts
// is noticed too (see shutdownSignal).
const PARENT = process.ppid

function fail (message, code = 'INVALID_ARGUMENT') {
  const err = new Error(message)
  err.tunnelCode = code
  throw err
}

/**
 * Resolve once SIGINT or SIGTERM arrives, or once the parent process is gone; a second signal
 * exits at once. The parent check is for `npx libtunnel …`: npm does not forward SIGTERM to the
 * command it runs, so a relay started through npx would outlive a `kill` of npx (the orphan is
 * re-parented, which changes `process.ppid`).
 */
function shutdownSignal () {
  return new Promise((resolve) => {
    let stopping = false
    const watch = setInterval(() => { if (process.ppid !== PARENT) onSignal() }, 500).unref()
    if (process.ppid !== PARENT) setImmediate(() => onSignal()) // gone while we were starting
    const onSignal = () => {
      if (stopping) return
      stopping = true
      clearInterval(watch)
      process.once('SIGINT', () => process.exit(130))
      resolve()
    }
    process.once('SIGINT', onSignal)
    process.once('SIGTERM', onSignal)
  })
}

// Unset flags come from TUNNEL_RELAY, TUNNEL_KEY, TUNNEL_CA, TUNNEL_TIMEOUT, TUNNEL_MODE (and
// ./.env), read by the core as in every face.
async function dialer (o) {
  return lib.Dialer.connect({ relay: o.relay, key: o.key, classic: o.classic || undefined, ca: o.ca, timeout: o.timeout !== undefined ? Number(o.timeout) * 1000 : undefined })
}

function local (addr) {
  return /^\d+$/.test(addr) ? { port: Number(addr) } : { local: addr }
}

async function run (cmd, o, args) {
  switch (cmd) {
    case 'server': {
      const config = {}
      for (const s of o.set ?? []) {
        const i = s.indexOf('=')
        if (i < 0) fail(`--set ${JSON.stringify(s)} must be NAME=VALUE`, 'INVALID_CONFIG')
        config[s.slice(0, i).trim().toLowerCase()] = s.slice(i + 1)
      }
      for (const name of ['listen', 'tcp-listen', 'auth-keys', 'allow', 'tls-cert', 'tls-key']) {
        if (o[name] !== undefined) config[name.replace(/-/g, '_')] = o[name]
      }
      const server = await lib.Server.start(config, { env: true, configFile: o.config })
      // The core's lines, so they are exactly what `tunnel server` prints.
      process.stdout.write(server.readyText)
      await shutdownSignal()
      return server.close()
    }
    case 'forward': {
      if (args.length !== 2) fail('usage: libtunnel forward LOCAL TARGET --relay URL --key KEY')
      const d = await dialer(o)
      const fwd = await d.forward(args[1], local(args[0]))
      console.log(`forwarding ${fwd.host}:${fwd.port} -> ${args[1]} via ${d.relay}`)
      await shutdownSignal()
      await fwd.close()
      return d.close()
    }
    case 'socks': {
      const d = await dialer(o)
      const proxy = await d.socks(local(o.listen))
      console.log(`socks5 proxy on ${proxy.host}:${proxy.port} via ${d.relay}`)
      await shutdownSignal()
      await proxy.close()
      return d.close()
    }
    case 'dial': {
      if (args.length !== 1) fail('usage: libtunnel dial TARGET --relay URL --key KEY')
      const d = await dialer(o)
      const sock = await d.dial(args[0], { allowHalfOpen: true })
      process.stdin.pipe(sock)
      sock.pipe(process.stdout)
      // The session ends when the remote side finishes, whatever stdin does.
      await new Promise((resolve, reject) => sock.on('end', resolve).on('error', reject))
      process.stdin.destroy()
      sock.destroy()
      return d.close()
    }
    case 'listen': {
      if (!o.to) fail('usage: libtunnel listen --to LOCAL [--relay URL] [--key FILE]')
      const listener = await lib.Listener.bind({ relay: o.relay, key: o.key, name: o.name, tcpPort: o['tcp-port'], ca: o.ca, allowHalfOpen: true })
      console.log(`listening as: ${listener.name}`)
      console.log(`dial: ${listener.name}:0 (through any dialer of this relay)`)
      if (listener.url) console.log(`http: ${listener.url}`)
      if (listener.tcpAddress) console.log(`tcp: ${listener.tcpAddress}`)
      console.log(`forwarding to: ${o.to}`)
      const [host, port] = [o.to.slice(0, o.to.lastIndexOf(':')), Number(o.to.slice(o.to.lastIndexOf(':') + 1))]
      listener.on('connection', (socket) => {
        const upstream = net.connect({ host, port, allowHalfOpen: true })
        upstream.on('error', (e) => { console.error(`cannot reach the local service at ${o.to}: ${e.message}; is it running?`); socket.destroy() })
        socket.on('error', () => upstream.destroy())
        socket.pipe(upstream).pipe(socket)
      })
      listener.on('error', (e) => console.error(`error [${e.tunnelCode}]: ${e.message}`))
      await shutdownSignal()
      listener.close()
      return listener.closed()
    }
    case 'keygen': {
      // The lines come from the core, so they are exactly what `tunnel keygen` prints.
      if (o.listener) {
        if (!o.out) fail('--listener needs --out FILE to write the private key to')
        process.stdout.write(native.listenerKeygenText(o.out))
        return
      }
      process.stdout.write(native.keygenText(o.kid !== undefined ? Number(o.kid) : undefined))
      return
    }
    case 'demo':
      return lib.demo()
  }
}

async function main (argv) {
  const [cmd, ...rest] = argv
  if (!cmd || cmd === '--help' || cmd === '-h' || !COMMANDS[cmd]) {
    console.log(USAGE)
    return cmd && !['--help', '-h'].includes(cmd) ? 2 : 0
  }
  try {
    const { values, positionals } = parseArgs({ args: rest, options: COMMANDS[cmd], allowPositionals: true })
    lib.setLogger((level, target, message) => {
      if (cmd !== 'demo' || level === 'warn' || level === 'error') console.error(`${new Date().toISOString()} ${level.toUpperCase().padStart(5)} ${target}: ${message}`)
    }, process.env.RUST_LOG || (cmd === 'demo' ? 'warn' : 'info'))
    await run(cmd, values, positionals)
    return 0
  } catch (err) {
    const name = err.tunnelCode ?? 'INVALID_ARGUMENT'
    console.error(`error [${name}]: ${err.message}`)
    return ['INVALID_CONFIG', 'INVALID_ARGUMENT'].includes(name) ? 2 : 1
  }
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code })
