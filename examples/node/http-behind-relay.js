'use strict'
// A node:http app behind NAT, reachable through a libtunnel relay.
//
//   With a relay:  TUNNEL_RELAY=wss://relay.example.com TUNNEL_LISTENER_KEY=listener.pem node http-behind-relay.js
//                  (serves until Ctrl-C; the app is at the printed http:// URL on the relay)
//   Self-contained: node http-behind-relay.js
//                  (starts an embedded relay on loopback, fetches the app once through it, exits)
const http = require('node:http')
const { Listener, Server, generateKey, generateListenerKey } = require(requireable('libtunnel') ? 'libtunnel' : '../../bindings/node')

function requireable (name) {
  try { require.resolve(name); return true } catch { return false }
}

const app = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json')
  res.end(JSON.stringify({ hello: 'from behind the relay', path: req.url, client: req.headers['x-forwarded-for'] }))
})

async function main () {
  if (process.env.TUNNEL_RELAY) {
    const listener = await Listener.bind({}) // TUNNEL_RELAY and TUNNEL_LISTENER_KEY
    listener.serve(app)
    console.log(`serving as ${listener.name} at ${listener.url ?? '(the relay has no http_listen)'}`)
    process.once('SIGINT', () => app.close())
    return
  }
  // No relay given: run one here, on loopback.
  const relay = await Server.start({
    listen: '127.0.0.1:0',
    http_listen: '127.0.0.1:0',
    auth_keys: generateKey().authKeys,
    allow: [{ host: '127.0.0.1', port: 9 }],
    listeners_open: true
  })
  const listener = await Listener.bind({ relay: relay.url, key: generateListenerKey().pem })
  listener.serve(app)
  console.log(`1. relay at ${relay.url}, public HTTP on port ${relay.httpAddress().port}`)
  console.log(`2. app registered as ${listener.name}: ${listener.url}`)
  // NAME.localhost may not resolve on this machine, so send the Host header to the relay's port.
  const body = await new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port: relay.httpAddress().port, path: '/hi', agent: false, headers: { host: new URL(listener.url).host } }, (res) => {
      let text = ''
      res.setEncoding('utf8').on('data', (d) => { text += d }).on('end', () => resolve(`${res.statusCode} ${text}`))
    }).on('error', reject)
  })
  console.log(`3. GET /hi through the relay: ${body}`)
  app.close() // closes the listener too (listener.serve)
  await listener.closed()
  await relay.close()
  console.log('4. closed; the process exits on its own')
}

main().catch((err) => {
  console.error(`error [${err.code}]: ${err.message}`)
  process.exitCode = 1
})
