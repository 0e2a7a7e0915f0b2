// A node:http service behind NAT, published through a relay: README.md shows this very file.
//   TUNNEL_RELAY=ws://relay.example.com:7835 TUNNEL_LISTENER_KEY=listener.pem node expose.js
const http = require('node:http')
const { Listener } = require('libtunnel')

async function main () {
  const app = http.createServer((req, res) => res.end('hello from behind NAT\n'))
  const listener = await Listener.bind() // relay and key: TUNNEL_RELAY, TUNNEL_LISTENER_KEY
  listener.serve(app) // every stream the relay routes to us becomes a connection of `app`
  listener.on('error', fail) // later, e.g. NAME_TAKEN when another process took the name
  listener.on('reconnecting', ({ attempt, delay }) => console.log(`relay lost; retry ${attempt} in ${delay} ms`))
  console.log(`reachable at ${listener.url}`) // http://NAME.<domain>:<port>
}

function fail (err) {
  console.error(`error [${err.tunnelCode}]: ${err.message}`)
  process.exit(1)
}

main().catch(fail)
