// The client against a real `tether serve` (the release binary; TETHER_BIN overrides it):
// channels on one connection, acknowledged publishes, reconnect and resume after the server
// restarts, a publish made while disconnected, and a permanent refusal that stops retrying.
// Run with `node --experimental-websocket --test` (Node 20's WebSocket).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { Client, TetherError, canReconnect } from '../index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const tetherBin = process.env.TETHER_BIN ?? path.join(root, 'target', 'release', 'tether');

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on('error', reject);
  });
}

/** `tether serve` on `port` with data in `data`; resolves once it listens. */
function serve(port, data) {
  const child = spawn(tetherBin, ['serve', '--listen', `127.0.0.1:${port}`, '--data', data], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { child.kill(); reject(new Error('tether serve did not start in 15 s')); }, 15000);
    child.on('exit', (code) => reject(new Error(`tether serve exited with ${code}`)));
    createInterface({ input: child.stdout }).on('line', (line) => {
      if (line.startsWith('listening on ')) {
        clearTimeout(timer);
        resolve({
          ws: `ws://127.0.0.1:${port}/ws`,
          http: `http://127.0.0.1:${port}`,
          // Stops it (SIGTERM: a graceful shutdown, closing each connection with 1001).
          stop: () => new Promise((done) => { child.removeAllListeners('exit'); child.on('exit', done); child.kill('SIGTERM'); }),
        });
      }
    });
  });
}

/** A data directory and a server on a fixed port, so that it can be restarted. */
async function fixture(t) {
  const data = mkdtempSync(path.join(os.tmpdir(), 'tether-js-'));
  const port = await freePort();
  const server = await serve(port, data);
  const state = { data, port, server };
  t.after(async () => {
    await state.server.stop();
    rmSync(data, { recursive: true, force: true });
  });
  return state;
}

/** Resolves with the first value `client` emits as `event` (and `test` accepts). */
function once(client, event, accept = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    const listener = (value) => {
      if (!accept(value)) return;
      clearTimeout(timer);
      client.off(event, listener);
      resolve(value);
    };
    client.on(event, listener);
  });
}

/** Collects a subscription's publications; `wait(n)` resolves once n have come. */
function collector() {
  const seen = [];
  let waiters = [];
  const handlers = {
    subscribed: [],
    onSubscribed: (reply) => handlers.subscribed.push(reply),
    onPublication: (publication) => {
      seen.push(publication);
      waiters = waiters.filter(({ n, resolve }) => (seen.length >= n ? (resolve(seen), false) : true));
    },
  };
  handlers.seen = seen;
  handlers.wait = (n, ms = 10000) => new Promise((resolve, reject) => {
    if (seen.length >= n) return resolve(seen);
    const timer = setTimeout(() => reject(new Error(`${seen.length} of ${n} publications within ${ms} ms`)), ms);
    waiters.push({ n, resolve: (value) => { clearTimeout(timer); resolve(value); } });
  });
  return handlers;
}

test('several channels on one connection, publishes acknowledged with their offset', async (t) => {
  const { server } = await fixture(t);
  const ann = new Client(server.ws, { name: 'ann' }).connect();
  t.after(() => ann.close());
  const session = await once(ann, 'connected');
  assert.equal(session.user, 'ann');
  assert.equal(session.guest, true);

  const lobby = collector();
  const kitchen = collector();
  const a = ann.subscribe('room:lobby', lobby);
  const b = ann.subscribe('room:kitchen', kitchen);
  assert.deepEqual(await a.publish({ text: 'hello lobby' }), { offset: 1 });
  assert.deepEqual(await b.publish({ text: 'hello kitchen' }), { offset: 1 });
  assert.deepEqual(await a.publish({ text: 'again' }), { offset: 2 });
  await lobby.wait(2);
  await kitchen.wait(1);
  assert.deepEqual(lobby.seen.map((p) => p.data.text), ['hello lobby', 'again']);
  assert.deepEqual(kitchen.seen.map((p) => [p.channel, p.offset]), [['room:kitchen', 1]]);
  assert.equal(a.offset, 2);
  assert.deepEqual(await a.presence(), [{ user: 'ann', clients: 1 }]);
  const history = await a.history({ limit: 10 });
  assert.equal(history.publications.length, 2);

  // Over the size limit: refused before it is sent.
  const huge = 'x'.repeat(session.limits.message_size);
  await assert.rejects(a.publish({ text: huge }), (e) => e instanceof TetherError && e.code === 111);
});

test('after the server restarts, each channel resumes from its offset, nothing lost or doubled', async (t) => {
  const state = await fixture(t);
  const ann = new Client(state.server.ws, { name: 'ann', minDelay: 200, maxDelay: 1000, timeout: 2000 }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  const lobby = collector();
  const sub = ann.subscribe('room:r', lobby);
  await sub.publish({ text: 'm1' });
  await lobby.wait(1);

  const gone = once(ann, 'disconnected');
  await state.server.stop();
  const disconnected = await gone;
  assert.equal(disconnected.code, 1001);
  assert.equal(disconnected.reconnect, true);
  // While it is down, a publish waits for the connection.
  const queued = sub.publish({ text: 'm2 (sent while disconnected)' });

  state.server = await serve(state.port, state.data);
  // Another client publishes as soon as it can: before or after ann is back.
  const ben = new Client(state.server.ws, { name: 'ben' }).connect();
  t.after(() => ben.close());
  await once(ben, 'connected');
  const benSub = ben.subscribe('room:r', {});
  await benSub.publish({ text: 'm3' });
  await benSub.publish({ text: 'm4' });

  assert.equal((await queued).offset >= 2, true);
  await lobby.wait(4);
  await new Promise((r) => setTimeout(r, 200));
  const texts = lobby.seen.map((p) => p.data.text).sort();
  assert.deepEqual(texts, ['m1', 'm2 (sent while disconnected)', 'm3', 'm4']);
  const offsets = lobby.seen.map((p) => p.offset).sort((x, y) => x - y);
  assert.deepEqual(offsets, [1, 2, 3, 4], 'every offset once');
  const resubscribed = lobby.subscribed.at(-1);
  assert.equal(lobby.subscribed.length, 2);
  assert.equal(resubscribed.recovered, true, JSON.stringify(resubscribed));
  const history = await sub.history({ limit: 10 });
  assert.equal(history.publications.filter((p) => p.data.text.startsWith('m2')).length, 1, 'stored once');
});

test('a refusal that retrying cannot heal stops the client', async (t) => {
  const { server, data } = await fixture(t);
  const added = spawnSync(tetherBin, ['user', 'add', 'root', '--data', data, '--password-stdin'], {
    input: 'correct horse battery\n',
  });
  assert.equal(added.status, 0, String(added.stderr));
  const issued = await fetch(`${server.http}/api/tokens`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user: 'root', password: 'correct horse battery' }),
  });
  assert.equal(issued.status, 201);
  const { token } = await issued.json();

  const client = new Client(server.ws, { token, minDelay: 50, maxDelay: 100 }).connect();
  t.after(() => client.close());
  const session = await once(client, 'connected');
  assert.equal(session.user, 'root');
  assert.equal(session.guest, false);
  let attempts = 0;
  client.on('connecting', () => { attempts += 1; });
  const closed = once(client, 'closed');
  const revoked = await fetch(`${server.http}/api/logout`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: '{}',
  });
  assert.equal(revoked.status < 300, true, `logout: ${revoked.status}`);
  const end = await closed;
  assert.equal(end.code, 4502);
  assert.equal(client.state, 'closed');
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(attempts, 0, 'no reconnect after a permanent refusal');

  // A guest asking for a registered user's name: told once, in the protocol, and no retry.
  const guest = new Client(server.ws, { name: 'root', minDelay: 50, maxDelay: 100 });
  t.after(() => guest.close());
  let guestAttempts = 0;
  guest.on('connecting', () => { guestAttempts += 1; });
  const failed = once(guest, 'error');
  guest.connect();
  const error = await failed;
  assert.equal(error.code, 4503);
  assert.equal(error.temporary, false);
  assert.match(error.message, /registered user/);
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(guest.state, 'closed');
  assert.equal(guestAttempts, 1, 'one attempt, no retry');
});

test('which close codes reconnect', () => {
  for (const code of [1001, 1006, 1011, 1012, 1013, 4000, 4001, 4499]) assert.equal(canReconnect(code), true, `${code}`);
  for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 4500, 4501, 4503, 4999]) assert.equal(canReconnect(code), false, `${code}`);
  assert.equal(canReconnect(4502), false);
  assert.equal(canReconnect(4502, true), true, 'with a source of fresh tokens');
});
