// A gRPC server in Node (@grpc/grpc-js), run by test_grpc.py behind a libtunnel h2c listener.
// Messages are raw bytes (identity serializers: no protobuf schema needed). Prints
// "listening PORT" once bound; exits when stdin closes (or, with GRPC_SERVER_FOREVER=1 as
// bench/http.sh runs it, when killed).
//
// Methods of test.Probe:
//   Echo        unary: answers the request bytes
//   Fail        unary: status INVALID_ARGUMENT, details "bad probe: <request>", trailer x-why
//   Slow        unary: answers after 5 s (for deadline tests)
//   Gather      unary: waits until N calls of Gather are in progress at once (N = request
//               text), then answers "N" to all; proves concurrency through one connection
//   Count       server streaming: request "N" -> N messages "0".."N-1"
//   Sum         client streaming: answers "<count> <sha256 hex of the concatenation>"
//   Chat        bidi: echoes each message
const grpc = require('@grpc/grpc-js');
const crypto = require('crypto');

const raw = { serialize: (b) => b, deserialize: (b) => b };
function method(name, requestStream, responseStream) {
  return {
    path: `/test.Probe/${name}`,
    requestStream,
    responseStream,
    requestSerialize: raw.serialize,
    requestDeserialize: raw.deserialize,
    responseSerialize: raw.serialize,
    responseDeserialize: raw.deserialize,
  };
}
const service = {
  Echo: method('Echo', false, false),
  Fail: method('Fail', false, false),
  Slow: method('Slow', false, false),
  Gather: method('Gather', false, false),
  Count: method('Count', false, true),
  Sum: method('Sum', true, false),
  Chat: method('Chat', true, true),
};

const gathering = [];
const impl = {
  Echo: (call, cb) => cb(null, call.request),
  Fail: (call, cb) => {
    const md = new grpc.Metadata();
    md.set('x-why', 'the probe asked for it');
    cb({ code: grpc.status.INVALID_ARGUMENT, details: `bad probe: ${call.request.toString()}`, metadata: md });
  },
  Slow: (call, cb) => {
    const t = setTimeout(() => cb(null, Buffer.from('late')), 5000);
    call.on('cancelled', () => clearTimeout(t));
  },
  Gather: (call, cb) => {
    const want = parseInt(call.request.toString(), 10);
    gathering.push(cb);
    if (gathering.length >= want) {
      for (const done of gathering.splice(0)) done(null, Buffer.from(String(want)));
    }
  },
  Count: (call) => {
    const n = parseInt(call.request.toString(), 10);
    let i = 0;
    const more = () => {
      while (i < n) {
        if (!call.write(Buffer.from(String(i++)))) {
          call.once('drain', more);
          return;
        }
      }
      call.end();
    };
    more();
  },
  Sum: (call, cb) => {
    const h = crypto.createHash('sha256');
    let count = 0;
    call.on('data', (m) => { h.update(m); count++; });
    call.on('end', () => cb(null, Buffer.from(`${count} ${h.digest('hex')}`)));
  },
  Chat: (call) => {
    call.on('data', (m) => call.write(m));
    call.on('end', () => call.end());
  },
};

const server = new grpc.Server({ 'grpc.max_receive_message_length': 64 << 20, 'grpc.max_send_message_length': 64 << 20 });
server.addService(service, impl);
server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    console.error(err);
    process.exit(1);
  }
  console.log(`listening ${port}`);
});
if (process.env.GRPC_SERVER_FOREVER !== '1') {
  process.stdin.on('end', () => server.tryShutdown(() => process.exit(0)));
  process.stdin.resume();
}
