// uWebSockets.js topic pub/sub peer for `tether bench fanout`.
//
//   node fanout.mjs PORT        (PORT 0 = any free port)
//
// Listens on 127.0.0.1:PORT. A WebSocket upgrade on any path is accepted and the socket is
// subscribed to the single topic `fanout`; every message a socket sends is published to that
// topic with `app.publish('fanout', message, isBinary)`, so one client publishing reaches
// every subscriber, itself included. Prints exactly one line to stdout once listening:
//
//   listening on ws://127.0.0.1:PORT/
//
// and exits 0 on SIGTERM/SIGINT, after a one-line summary on stderr.

import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

// Load the native addon directly rather than through the package's `main`: that entry falls
// back (with just a warning) to a pure-JS implementation built on `ws` when the binary does
// not load, which would make this a benchmark of `ws`, not of uWebSockets. Fail loudly instead.
const require = createRequire(import.meta.url);
const PACKAGE = '@trufflesuite/uws-js-unofficial';
const packageDir = dirname(require.resolve(`${PACKAGE}/package.json`));
const binary = join(
  packageDir,
  'binaries',
  `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
);
let uWS;
try {
  uWS = require(binary);
} catch (error) {
  console.error(
    `fanout: cannot load the uWebSockets.js native addon ${binary} ` +
      `(node ${process.version}, ABI ${process.versions.modules}): ${error.message}\n` +
      `${PACKAGE} ships binaries for Node 16, 18 and 20 (ABI 93, 108, 115) only.`,
  );
  process.exit(1);
}

const TOPIC = 'fanout';

const arg = process.argv[2] ?? '0';
const port = Number(arg);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`usage: node fanout.mjs PORT   (0 = any free port; got ${JSON.stringify(arg)})`);
  process.exit(2);
}

const sockets = new Set();
let peak = 0;
let accepted = 0;
let received = 0;

const app = uWS.App();

app.ws('/*', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  // Backpressure, per uWS.js's typings (node_modules/@trufflesuite/uws-js-unofficial/docs/
  // index.d.ts, WebSocketBehavior and WebSocket.publish/send):
  //  - maxBackpressure: the maximum backpressure allowed per socket when publishing or
  //    sending; "slow receivers with too high backpressure will be skipped until they catch
  //    up or timeout" (default 64 KiB). For a direct ws.send() the limit makes send() return
  //    2, "dropped due to backpressure limit".
  //  - closeOnBackpressureLimit: whether to close the socket automatically when a message is
  //    dropped due to backpressure (default false).
  //  - publish(): backpressure "is managed according to maxBackpressure,
  //    closeOnBackpressureLimit settings. Order is guaranteed since v20."
  // So with false (as here) a subscriber over the limit stays connected and misses what is
  // published meanwhile; with idleTimeout 0 it is never timed out. check.mjs observes exactly
  // that: a paused subscriber keeps an intact, in-order prefix, is not closed, and gets new
  // messages again once it has drained; the skipped ones are not queued for it.
  maxBackpressure: 1024 * 1024,
  closeOnBackpressureLimit: false,
  // 0 disables the idle timeout: idle subscribers are never dropped (no automatic pings).
  idleTimeout: 0,
  maxLifetime: 0,
  sendPingsAutomatically: false,

  open: (ws) => {
    ws.subscribe(TOPIC);
    sockets.add(ws);
    accepted += 1;
    if (sockets.size > peak) peak = sockets.size;
  },
  message: (ws, message, isBinary) => {
    received += 1;
    // `message` is valid only during this callback (typings), so publish it right here.
    app.publish(TOPIC, message, isBinary);
  },
  close: (ws) => {
    sockets.delete(ws);
  },
});

app.any('/*', (res) => {
  res.writeStatus('426 Upgrade Required').writeHeader('Upgrade', 'websocket').end('WebSocket only\n');
});

let listenSocket = null;
let stopping = false;
function stop(signal) {
  if (stopping) return;
  stopping = true;
  console.error(
    `fanout: ${signal}: accepted ${accepted} connections (peak ${peak} open, ${sockets.size} open now), ` +
      `${received} messages published to ${TOPIC}`,
  );
  if (listenSocket) uWS.us_listen_socket_close(listenSocket);
  listenSocket = null;
  // Closing the app closes every connection; then leave without waiting on clients.
  if (typeof app.close === 'function') app.close();
  process.exit(0);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));

app.listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`fanout: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  listenSocket = token;
  const actual = uWS.us_socket_local_port(token);
  process.stdout.write(`listening on ws://127.0.0.1:${actual}/\n`);
});

