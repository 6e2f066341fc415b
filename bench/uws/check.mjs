// Self-check for fanout.mjs (no dependencies; Node 20 needs --experimental-websocket for the
// global WebSocket, Node 22+ has it by default):
//
//   node --experimental-websocket check.mjs [SUBSCRIBERS=200] [MESSAGES=100]
//
// 1. Fan-out: starts fanout.mjs on a free port, opens SUBSCRIBERS connections, has the first
//    one send MESSAGES messages (every tenth binary, the rest text) and checks that every
//    subscriber, the sender included, receives all of them, in order, with the right type.
// 2. Backpressure: a raw-TCP subscriber completes the handshake and then stops reading while
//    another client publishes ~60 MiB (1000 x 60 KiB, one at a time). The slow subscriber must
//    stay connected, receive a strictly increasing, intact subset of the messages (those
//    published while it was over maxBackpressure are skipped), and, once it has caught up,
//    receive the next message published.
// Prints a summary and exits 0 when everything held, 1 otherwise. Every step is bounded in
// time; the server is stopped with SIGTERM (its exit code must be 0).

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';

if (typeof WebSocket !== 'function') {
  console.error('check: no global WebSocket; run with `node --experimental-websocket check.mjs` on Node 20');
  process.exit(1);
}

const SUBSCRIBERS = Number(process.argv[2] ?? 200);
const MESSAGES = Number(process.argv[3] ?? 100);
const CONCURRENT_OPENS = 200;
const SLOW_MESSAGES = 1000;
const SLOW_SIZE = 60 * 1024;

const failures = [];
const fail = (what) => {
  failures.push(what);
  console.log(`FAIL ${what}`);
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const withTimeout = (promise, ms, what) =>
  Promise.race([
    promise,
    sleep(ms).then(() => {
      throw new Error(`timed out after ${ms} ms: ${what}`);
    }),
  ]);

// --- server ---------------------------------------------------------------------------------
const server = spawn(process.execPath, [fileURLToPath(new URL('./fanout.mjs', import.meta.url)), '0'], {
  stdio: ['ignore', 'pipe', 'pipe'],
});
let serverErr = '';
server.stderr.on('data', (d) => (serverErr += d));
let serverExit = null;
server.on('exit', (code, signal) => (serverExit = { code, signal }));

async function stopServer() {
  if (serverExit) return serverExit;
  server.kill('SIGTERM');
  try {
    await withTimeout(once(server, 'exit'), 5000, 'server exit after SIGTERM');
  } catch (e) {
    server.kill('SIGKILL');
    await once(server, 'exit');
    fail(e.message);
  }
  return serverExit;
}
process.on('uncaughtException', (e) => {
  console.error(e);
  server.kill('SIGKILL');
  process.exit(1);
});

let url;
{
  let out = '';
  const line = new Promise((resolve, reject) => {
    server.stdout.on('data', (d) => {
      out += d;
      const m = /^listening on (ws:\/\/127\.0\.0\.1:(\d+)\/)\n/.exec(out);
      if (m) resolve(m);
    });
    server.on('exit', () => reject(new Error(`server exited before listening: ${serverErr}`)));
  });
  const m = await withTimeout(line, 10000, 'listening line');
  url = m[1];
}
const port = Number(new URL(url).port);
console.log(`server: ${url} (node ${process.version})`);

// --- 1. fan-out -----------------------------------------------------------------------------
function openClient(index) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    const client = { index, ws, next: 0, error: null, closed: false, done: null };
    client.finished = new Promise((r) => (client.done = r));
    ws.onopen = () => resolve({ client });
    ws.onerror = (e) => {
      client.error ??= e?.message ?? e?.error?.message ?? 'error';
    };
    ws.onclose = (e) => {
      client.closed = true;
      resolve({ error: client.error ?? `closed before open (code ${e.code})` });
      client.done();
    };
    ws.onmessage = (e) => {
      const i = client.next;
      const binary = i % 10 === 9;
      let ok;
      if (binary) ok = e.data instanceof ArrayBuffer && e.data.byteLength === 4 && new DataView(e.data).getUint32(0) === i;
      else ok = e.data === `message ${i}`;
      if (!ok) {
        client.error ??= `message ${i}: got ${e.data instanceof ArrayBuffer ? `binary(${e.data.byteLength})` : JSON.stringify(e.data)}`;
      }
      client.next += 1;
      if (client.next === MESSAGES) client.done();
    };
  });
}

const clients = [];
const openErrors = new Map();
const t0 = performance.now();
for (let start = 0; start < SUBSCRIBERS; start += CONCURRENT_OPENS) {
  const batch = [];
  for (let i = start; i < Math.min(SUBSCRIBERS, start + CONCURRENT_OPENS); i++) batch.push(openClient(i));
  for (const r of await Promise.all(batch)) {
    if (r.client) clients.push(r.client);
    else openErrors.set(r.error, (openErrors.get(r.error) ?? 0) + 1);
  }
}
const openMs = performance.now() - t0;
console.log(`fan-out: ${clients.length}/${SUBSCRIBERS} connections open in ${openMs.toFixed(0)} ms`);
for (const [error, n] of openErrors) console.log(`  ${n} failed to open: ${error}`);
if (clients.length !== SUBSCRIBERS) fail(`only ${clients.length} of ${SUBSCRIBERS} connections opened`);

if (clients.length > 0) {
  const sender = clients[0].ws;
  const t1 = performance.now();
  for (let i = 0; i < MESSAGES; i++) {
    if (i % 10 === 9) {
      const b = new ArrayBuffer(4);
      new DataView(b).setUint32(0, i);
      sender.send(b);
    } else sender.send(`message ${i}`);
  }
  const budget = 10000 + Math.ceil((clients.length * MESSAGES) / 20);
  try {
    await withTimeout(Promise.all(clients.map((c) => c.finished)), budget, 'all subscribers receiving every message');
  } catch (e) {
    fail(e.message);
  }
  const ms = performance.now() - t1;
  const complete = clients.filter((c) => c.next === MESSAGES && !c.error && !c.closed).length;
  const deliveries = clients.reduce((n, c) => n + c.next, 0);
  console.log(
    `fan-out: ${complete}/${clients.length} subscribers got all ${MESSAGES} messages in order ` +
      `(${deliveries} deliveries in ${ms.toFixed(0)} ms)`,
  );
  const bad = clients.filter((c) => !(c.next === MESSAGES && !c.error && !c.closed));
  for (const c of bad.slice(0, 5)) {
    console.log(`  subscriber ${c.index}: ${c.next} received, ${c.closed ? 'closed, ' : ''}${c.error ?? ''}`);
  }
  if (bad.length) fail(`${bad.length} subscribers missed or misordered messages`);
}
for (const c of clients) c.ws.close();
await withTimeout(
  Promise.all(clients.map((c) => (c.closed ? null : once(c.ws, 'close')))),
  20000,
  'closing the fan-out connections',
).catch((e) => fail(e.message));

// --- 2. backpressure: a subscriber that stops reading ------------------------------------
// Frames from the server are unmasked: parse them by hand.
function parseFrames(state, chunk, onFrame) {
  state.buf = state.buf.length ? Buffer.concat([state.buf, chunk]) : chunk;
  for (;;) {
    const b = state.buf;
    if (b.length < 2) return;
    let len = b[1] & 0x7f;
    let off = 2;
    if (len === 126) {
      if (b.length < 4) return;
      len = b.readUInt16BE(2);
      off = 4;
    } else if (len === 127) {
      if (b.length < 10) return;
      len = Number(b.readBigUInt64BE(2));
      off = 10;
    }
    if (b.length < off + len) return;
    onFrame(b[0] & 0x0f, b.subarray(off, off + len));
    state.buf = b.subarray(off + len);
  }
}

async function rawSubscriber() {
  const sock = net.connect(port, '127.0.0.1');
  await once(sock, 'connect');
  sock.write(
    `GET /slow HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  );
  const slow = { sock, frames: [], closed: false, lastData: 0, state: { buf: Buffer.alloc(0) } };
  let head = Buffer.alloc(0);
  let upgraded = false;
  const ready = new Promise((resolve, reject) => {
    sock.on('data', (d) => {
      slow.lastData = performance.now();
      if (!upgraded) {
        head = Buffer.concat([head, d]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        if (!/^HTTP\/1\.1 101 /.test(head.toString('latin1', 0, end))) {
          reject(new Error(`handshake: ${head.toString('latin1', 0, end).split('\r\n')[0]}`));
          return;
        }
        upgraded = true;
        resolve();
        d = head.subarray(end + 4);
      }
      parseFrames(slow.state, d, (opcode, payload) => slow.frames.push({ opcode, payload: Buffer.from(payload) }));
    });
    sock.on('close', () => (slow.closed = true));
    sock.on('error', () => {});
  });
  await withTimeout(ready, 5000, 'raw subscriber handshake');
  return slow;
}

try {
  const slow = await rawSubscriber();
  slow.sock.pause(); // stop reading: the kernel buffers fill, then uWS's backpressure does.

  const pub = new WebSocket(url);
  pub.binaryType = 'arraybuffer';
  await withTimeout(once(pub, 'open'), 5000, 'publisher open');
  const message = (seq) => {
    const b = Buffer.alloc(SLOW_SIZE, seq & 0xff);
    b.writeUInt32BE(seq, 0);
    return b;
  };
  // One at a time: publish the next only once the publisher's own copy came back, so the
  // publisher (itself a subscriber that reads) never goes over the limit.
  let echoed = -1;
  let wake = null;
  pub.onmessage = (e) => {
    echoed = new DataView(e.data).getUint32(0);
    wake?.();
  };
  const publish = async (seq) => {
    const got = new Promise((r) => (wake = r));
    pub.send(message(seq));
    await withTimeout(got, 5000, `echo of message ${seq}`);
    if (echoed !== seq) throw new Error(`publisher got ${echoed} for ${seq}`);
  };
  const t2 = performance.now();
  for (let seq = 0; seq < SLOW_MESSAGES; seq++) await publish(seq);
  const publishMs = performance.now() - t2;

  slow.sock.resume();
  // Drain until nothing has arrived for 500 ms (bounded at 20 s).
  const drainStart = performance.now();
  while (performance.now() - drainStart < 20000) {
    await sleep(100);
    if (performance.now() - Math.max(slow.lastData, drainStart) > 500) break;
  }
  const before = slow.frames.length;
  const seqs = [];
  let intact = true;
  for (const f of slow.frames) {
    const seq = f.payload.readUInt32BE(0);
    seqs.push(seq);
    if (f.opcode !== 2 || f.payload.length !== SLOW_SIZE || f.payload[SLOW_SIZE - 1] !== (seq & 0xff)) intact = false;
  }
  const increasing = seqs.every((s, i) => i === 0 || s > seqs[i - 1]);
  const gaps = seqs.reduce((n, s, i) => n + (s !== (i === 0 ? 0 : seqs[i - 1] + 1) ? 1 : 0), 0);
  console.log(
    `backpressure: published ${SLOW_MESSAGES} x ${SLOW_SIZE / 1024} KiB in ${publishMs.toFixed(0)} ms; ` +
      `the paused subscriber then received ${before} (first ${seqs[0]}, last ${seqs.at(-1)}, ` +
      `${gaps} gap(s)), ${increasing ? 'strictly increasing' : 'NOT increasing'}, ` +
      `${intact ? 'intact' : 'NOT intact'}, connection ${slow.closed ? 'CLOSED' : 'still open'}`,
  );
  if (slow.closed) fail('slow subscriber was closed');
  if (!increasing || !intact) fail('slow subscriber frames out of order or damaged');
  if (before >= SLOW_MESSAGES) fail('slow subscriber missed nothing: backpressure limit never reached');

  // Caught up: the next publish must reach it again.
  await publish(SLOW_MESSAGES);
  const deadline = performance.now() + 5000;
  while (slow.frames.length === before && performance.now() < deadline) await sleep(20);
  const after = slow.frames[before];
  const ok = after && after.payload.readUInt32BE(0) === SLOW_MESSAGES;
  console.log(`backpressure: after catching up, the slow subscriber ${ok ? 'received' : 'did NOT receive'} the next message`);
  if (!ok) fail('slow subscriber did not receive messages after catching up');

  pub.close();
  slow.sock.end();
  await withTimeout(once(pub, 'close'), 5000, 'publisher close').catch((e) => fail(e.message));
  slow.sock.destroy();
} catch (e) {
  fail(`backpressure: ${e.message}`);
}

// --- stop -----------------------------------------------------------------------------------
const exit = await stopServer();
console.log(`server: ${serverErr.trim()} -> exit ${exit.code ?? exit.signal}`);
if (exit.code !== 0) fail(`server exited with ${exit.code ?? exit.signal} on SIGTERM`);

console.log(failures.length ? `check: ${failures.length} failure(s)` : 'check: ok');
process.exit(failures.length ? 1 : 0);
