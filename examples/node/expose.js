// A node:http service behind NAT, published through a relay: README.md shows this very file.
//   TUNNEL_RELAY=ws://relay.example.com:7835 TUNNEL_LISTENER_KEY=listener.pem node expose.js
const http = require('node:http')
const { Listener } = require('libtunnel')

async function main () {
  const app = http.createServer((req, res) => res.end('hello from behind NAT\n'))
  const listener = await Listener.bind() // relay and key: TUNNEL_RELAY, TUNNEL_LISTENER_KEY
  listener.serve(app) // every stream the relay routes to us becomes a connection of `app`
  console.log(`reachable at ${listener.url}`) // http://NAME.<domain>:<port>
}

main().catch((err) => {
  console.error(`error [${err.tunnelCode}]: ${err.message}`)
  process.exit(1)
})
