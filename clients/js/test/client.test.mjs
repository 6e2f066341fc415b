// The client against a real `tether serve` (the release binary; TETHER_BIN overrides it):
// channels on one connection, acknowledged publishes, reconnect and resume after the server
// restarts, a publish made while disconnected, and a permanent refusal that stops retrying.
// Run with `node --experimental-websocket --test` (Node 20's WebSocket).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { Client, TetherError, canReconnect } from '../index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const tetherBin = process.env.TETHER_BIN ?? path.join(root, 'target', 'release', 'tether');

/**
 * `tether serve` on `port` (0: a free one, which it picks itself) with data in `data`;
 * resolves once it listens, with the port it took, to restart it on the same one.
 */
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
        port = Number(new URL(line.slice('listening on '.length).trim()).port);
        resolve({
          port,
          ws: `ws://127.0.0.1:${port}/ws`,
          http: `http://127.0.0.1:${port}`,
          // Stops it (SIGTERM: a graceful shutdown, closing each connection with 1001).
          // Stopping a stopped server is done at once (a test that failed halfway leaves one).
          stop: () => new Promise((done) => {
            if (child.exitCode !== null || child.signalCode !== null) return done();
            child.removeAllListeners('exit');
            child.on('exit', done);
            child.kill('SIGTERM');
          }),
        });
      }
    });
  });
}

/** A data directory and a server on a fixed port, so that it can be restarted. */
async function fixture(t) {
  const data = mkdtempSync(path.join(os.tmpdir(), 'tether-js-'));
  const server = await serve(0, data);
  const state = { data, port: server.port, server };
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
  const ann = new Client(server.ws, { name: 'ann', info: { device: 'phone' } }).connect();
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
  assert.deepEqual(await a.presence(), [{ user: 'ann', clients: 1, info: [{ device: 'phone' }] }]);
  const history = await a.history({ limit: 10 });
  assert.equal(history.publications.length, 2);

  // Over the size limit: refused before it is sent.
  const huge = 'x'.repeat(session.limits.message_size);
  await assert.rejects(a.publish({ text: huge }), (e) => e instanceof TetherError && e.code === 111);
});

test('after the server restarts, each channel resumes from its offset, nothing lost or doubled', async (t) => {
  const state = await fixture(t);
  const ann = new Client(state.server.ws, { name: 'ann', minDelay: 200, maxDelay: 1000 }).connect();
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

test('a token travels in connect, not the URL; a refusal that retrying cannot heal stops the client', async (t) => {
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

  const urls = [];
  const rec = recording();
  class Watched extends rec.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push(String(url));
    }
  }
  const client = new Client(server.ws, { token, minDelay: 50, maxDelay: 100, WebSocket: Watched }).connect();
  t.after(() => client.close());
  const session = await once(client, 'connected');
  assert.equal(session.user, 'root');
  assert.equal(session.guest, false);
  // The token went in the first command, not in the URL (which servers and proxies log).
  assert.equal(urls.some((u) => u.includes(token)), false, `${urls}`);
  assert.equal(rec.sent[0].op, 'connect');
  assert.equal(rec.sent[0].token, token);
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

/** A WebSocket constructor that records the commands sent through it (and can drop a connection right after one). */
function recording() {
  const sent = [];
  const hooks = { afterSend: null };
  class Recording extends WebSocket {
    send(data) {
      super.send(data);
      const command = JSON.parse(data);
      sent.push(command);
      hooks.afterSend?.(command, this);
    }
  }
  return { WebSocket: Recording, sent, hooks, ops: () => sent.map((c) => (c.channel ? `${c.op} ${c.channel}` : c.op)) };
}

/** Resolves once `check()` is true (polled), or rejects after `ms`. */
async function until(check, what, ms = 10000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Who the server counts in `channel`, asked by `client` (subscribed to it). */
async function members(client, channel) {
  return (await client.subscription(channel).presence()).map((m) => `${m.user}×${m.clients}`);
}

test('unsubscribe() while the subscribe is on its way: the server lets go, no handler runs, the channel can be subscribed again', async (t) => {
  const { server } = await fixture(t);
  const ben = new Client(server.ws, { name: 'ben' }).connect();
  t.after(() => ben.close());
  await once(ben, 'connected');
  const watched = collector();
  ben.subscribe('room:x', watched);
  await until(() => watched.subscribed.length === 1, 'ben subscribed');

  const rec = recording();
  const ann = new Client(server.ws, { name: 'ann', WebSocket: rec.WebSocket }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  const calls = [];
  const handlers = {
    onSubscribed: () => calls.push('onSubscribed'),
    onPublication: () => calls.push('onPublication'),
    onJoin: () => calls.push('onJoin'),
    onError: (e) => calls.push(`onError ${e.code}`),
  };
  const s = ann.subscribe('room:x', handlers);
  assert.equal(s.state, 'subscribing');
  await s.unsubscribe();
  assert.equal(s.state, 'removed');
  assert.deepEqual(rec.ops(), ['connect', 'subscribe room:x', 'unsubscribe room:x'], 'the unsubscribe follows the reply');
  assert.deepEqual(await members(ben, 'room:x'), ['ben×1'], 'the server let ann go');
  await ben.subscription('room:x').publish({ text: 'after' });
  await watched.wait(1);
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(calls, [], 'no handler of the removed subscription ran');
  assert.equal(ann.subscription('room:x'), undefined);

  // Subscribing again works, and is restored after reconnects as usual.
  const again = collector();
  const s2 = ann.subscribe('room:x', { ...again, onError: (e) => calls.push(`onError ${e.code}`) });
  await until(() => again.subscribed.length === 1 || calls.length > 0, 'subscribed again');
  assert.deepEqual(calls, []);
  assert.equal(s2.state, 'subscribed');
  assert.deepEqual(await members(ben, 'room:x'), ['ann×1', 'ben×1']);
  assert.equal(await s.unsubscribe(), undefined, 'unsubscribe() again: the same, settled promise');
  assert.equal(s2.state, 'subscribed', 'the old subscription does not touch the new one');
});

test('subscribe, unsubscribe, subscribe in a row: the last subscription holds, nothing is refused', async (t) => {
  const { server } = await fixture(t);
  const rec = recording();
  const ann = new Client(server.ws, { name: 'ann', WebSocket: rec.WebSocket }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  const errors = [];
  const first = { subscribed: 0 };
  const s1 = ann.subscribe('room:y', { onSubscribed: () => { first.subscribed += 1; }, onError: (e) => errors.push(e) });
  const left = s1.unsubscribe();
  const second = collector();
  const s2 = ann.subscribe('room:y', { ...second, onError: (e) => errors.push(e) });
  const left2 = s2.unsubscribe();
  const third = collector();
  const s3 = ann.subscribe('room:y', { ...third, onError: (e) => errors.push(e) });
  // Published at once: sent once the subscription it needs is confirmed.
  const early = s3.publish({ text: 'early' });
  await left;
  await left2;
  await until(() => third.subscribed.length === 1 || errors.length > 0, 'the last subscription confirmed');
  assert.deepEqual(errors, []);
  assert.equal(first.subscribed, 0);
  assert.equal(second.subscribed.length, 0);
  assert.equal(s3.state, 'subscribed');
  assert.equal(ann.subscription('room:y'), s3);
  assert.deepEqual((await early).offset, 1);
  assert.deepEqual(rec.ops(), ['connect', 'subscribe room:y', 'unsubscribe room:y', 'subscribe room:y', 'publish room:y'],
    'the one that never went out sends nothing; the publish follows the subscribe');
  assert.deepEqual(await members(ann, 'room:y'), ['ann×1']);
  // Its publications reach the last subscription only, each once.
  await s3.publish({ text: 'one' });
  await third.wait(2);
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(third.seen.map((p) => p.data.text), ['early', 'one']);
  assert.equal(second.seen.length, 0);
});

test('unsubscribe() while a refused subscribe is on its way: nothing more is sent, onError does not run', async (t) => {
  const { server } = await fixture(t);
  const rec = recording();
  const ann = new Client(server.ws, { name: 'ann', WebSocket: rec.WebSocket }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  const errors = [];
  const s = ann.subscribe('nowhere:x', { onError: (e) => errors.push(e) });
  await s.unsubscribe();
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(errors, []);
  assert.equal(s.state, 'removed');
  assert.deepEqual(rec.ops(), ['connect', 'subscribe nowhere:x']);
  // Without unsubscribe(), the refusal is told.
  const told = new Promise((resolve) => ann.subscribe('nowhere:y', { onError: resolve }));
  assert.equal((await told).code, 102);
});

test('unsubscribe() while disconnected drops the subscription: it is not restored after the reconnect', async (t) => {
  const state = await fixture(t);
  const rec = recording();
  const ann = new Client(state.server.ws, { name: 'ann', WebSocket: rec.WebSocket, minDelay: 100, maxDelay: 300 }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  const gone = collector();
  const kept = collector();
  const s = ann.subscribe('room:gone', gone);
  ann.subscribe('room:kept', kept);
  await until(() => gone.subscribed.length === 1 && kept.subscribed.length === 1, 'both subscribed');

  const down = once(ann, 'disconnected');
  await state.server.stop();
  await down;
  assert.notEqual(ann.state, 'connected'); // disconnected, or trying again: the server is down
  await s.unsubscribe(); // nothing to tell a server that forgot us
  assert.equal(s.state, 'removed');
  rec.sent.length = 0;
  const back = once(ann, 'connected', () => true, 20000);
  state.server = await serve(state.port, state.data);
  await back;
  await until(() => kept.subscribed.length === 2, 'room:kept restored');
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(rec.ops(), ['connect', 'subscribe room:kept']);
  assert.equal(gone.subscribed.length, 1);
  assert.equal(ann.subscription('room:gone'), undefined);
});

test('reconnect(): at once while waiting out the backoff, pending publishes kept; nothing while connected or closed', async (t) => {
  const state = await fixture(t);
  // The longest backoff every time: without reconnect() the client would wait 30 s.
  const random = Math.random;
  Math.random = () => 0.999;
  t.after(() => { Math.random = random; });
  const ann = new Client(state.server.ws, { name: 'ann', minDelay: 30_000, maxDelay: 30_000, timeout: 5000 }).connect();
  t.after(() => ann.close());
  const first = await once(ann, 'connected');
  const room = collector();
  const sub = ann.subscribe('room:r', room);
  await sub.publish({ text: 'm1' });
  await room.wait(1);

  // Connected: nothing happens.
  let connecting = 0;
  ann.on('connecting', () => { connecting += 1; });
  assert.equal(ann.reconnect(), ann);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(connecting, 0);
  assert.equal(ann.state, 'connected');
  assert.equal(ann.session.client, first.client);

  const down = once(ann, 'disconnected');
  await state.server.stop();
  await down;
  assert.equal(ann.state, 'disconnected');
  const queued = sub.publish({ text: 'm2 (while disconnected)' });
  state.server = await serve(state.port, state.data);
  const started = Date.now();
  const back = once(ann, 'connected');
  ann.reconnect();
  ann.reconnect(); // again while connecting: nothing more
  await back;
  assert.equal(Date.now() - started < 10_000, true, 'not the 30 s backoff');
  assert.equal(connecting, 1, 'one attempt');
  assert.equal((await queued).offset, 2, 'the pending publish went through');
  await room.wait(2);
  assert.deepEqual(room.seen.map((p) => p.offset), [1, 2]);
  assert.equal(room.subscribed.at(-1).recovered, true);

  // Closed: nothing happens.
  ann.close();
  ann.reconnect();
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(ann.state, 'closed');
  assert.equal(connecting, 1);
});

test('every event sees the state it announces: connecting, connected, disconnected, closed', async (t) => {
  const state = await fixture(t);
  const ann = new Client(state.server.ws, { name: 'ann', minDelay: 100, maxDelay: 300 });
  t.after(() => ann.close());
  const seen = [];
  for (const event of ['connecting', 'connected', 'disconnected', 'closed']) {
    ann.on(event, (value) => seen.push(`${event}:${ann.state}${event === 'disconnected' ? `:${value.reconnect}` : ''}`));
  }
  ann.connect();
  await once(ann, 'connected');
  const back = once(ann, 'connected', () => true, 20000);
  await state.server.stop();
  await until(() => seen.includes('disconnected:disconnected:true'), 'disconnected');
  state.server = await serve(state.port, state.data);
  await back;
  ann.close();
  assert.deepEqual(seen.filter((e) => !e.startsWith('connecting') && !e.startsWith('disconnected')),
    ['connected:connected', 'connected:connected', 'closed:closed']);
  assert.equal(seen[0], 'connecting:connecting');
  assert.deepEqual([...new Set(seen.filter((e) => e.startsWith('connecting')))], ['connecting:connecting']);
  assert.deepEqual([...new Set(seen.filter((e) => e.startsWith('disconnected')))], ['disconnected:disconnected:true']);

  // A refusal for good: 'disconnected' already reads 'closed'.
  const added = spawnSync(tetherBin, ['user', 'add', 'root', '--data', state.data, '--password-stdin'], {
    input: 'correct horse battery\n',
  });
  assert.equal(added.status, 0, String(added.stderr));
  const guest = new Client(state.server.ws, { name: 'root' });
  t.after(() => guest.close());
  const refused = [];
  for (const event of ['disconnected', 'error', 'closed']) guest.on(event, () => refused.push(`${event}:${guest.state}`));
  const closed = once(guest, 'closed');
  guest.connect();
  await closed;
  assert.deepEqual(refused, ['disconnected:closed', 'error:closed', 'closed:closed']);
});

test('replies carry no id; channels without offsets keep offset and epoch null', async (t) => {
  const { server } = await fixture(t);
  const ann = new Client(server.ws, { name: 'ann' }).connect();
  t.after(() => ann.close());
  const session = await once(ann, 'connected');
  assert.deepEqual(Object.keys(session).sort(), ['client', 'guest', 'limits', 'user']);
  assert.deepEqual(ann.session, session);

  const polls = collector();
  const list = ann.subscribe('polls', polls);
  const room = collector();
  const lobby = ann.subscribe('room:lobby', room);
  await until(() => polls.subscribed.length === 1 && room.subscribed.length === 1, 'both subscribed');
  assert.equal('id' in polls.subscribed[0], false);
  assert.equal(Array.isArray(polls.subscribed[0].polls), true);
  assert.equal(list.offset, null);
  assert.equal(list.epoch, null);
  assert.equal('id' in room.subscribed[0], false);
  assert.equal(lobby.offset, 0);
  assert.equal(typeof lobby.epoch, 'string');
  const history = await lobby.history({ limit: 5 });
  assert.equal('id' in history, false);
});

test('a publish whose reply is lost to a disconnect is sent again with its key, and stored once', async (t) => {
  const { server } = await fixture(t);
  const rec = recording();
  const ann = new Client(server.ws, { name: 'ann', WebSocket: rec.WebSocket, minDelay: 100, maxDelay: 300 }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  const room = collector();
  const sub = ann.subscribe('room:z', room);
  await until(() => room.subscribed.length === 1, 'subscribed');
  // The connection drops right after the publish goes out, before its reply can come.
  rec.hooks.afterSend = (command, ws) => {
    if (command.op !== 'publish') return;
    rec.hooks.afterSend = null;
    ws.close(4000, 'dropped by the test');
  };
  const reply = await sub.publish({ text: 'once' });
  assert.equal(reply.offset, 1);
  const publishes = rec.sent.filter((c) => c.op === 'publish');
  assert.equal(publishes.length, 2, 'sent again after the reconnect');
  assert.equal(publishes[0].key, publishes[1].key, 'with the same key');
  const history = await sub.history({ limit: 10 });
  assert.deepEqual(history.publications.map((p) => p.data.text), ['once'], 'stored once');
});

test('which close codes reconnect', () => {
  for (const code of [1001, 1006, 1011, 1012, 1013, 4000, 4001, 4499]) assert.equal(canReconnect(code), true, `${code}`);
  for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 4500, 4501, 4503, 4999]) assert.equal(canReconnect(code), false, `${code}`);
  assert.equal(canReconnect(4502), false);
  assert.equal(canReconnect(4502, true), true, 'with a source of fresh tokens');
});

test('after a connection that lasted, failed handshakes back off further and further', { timeout: 60000 }, async (t) => {
  const state = await fixture(t);
  // The longest wait every time (full jitter at its ceiling): 100, 200, 400, 800, 1600 ms...
  const random = Math.random;
  Math.random = () => 0.999;
  t.after(() => { Math.random = random; });
  const ann = new Client(state.server.ws, { name: 'ann', minDelay: 100, maxDelay: 20_000 }).connect();
  t.after(() => ann.close());
  await once(ann, 'connected');
  // A connection that lasted: its loss starts the backoff over.
  await new Promise((r) => setTimeout(r, 10_500));
  const down = once(ann, 'disconnected');
  await state.server.stop();
  await down;
  // What answers on the port now refuses every upgrade, as an overloaded server does.
  let upgrades = 0;
  const refusing = http.createServer((req, res) => { res.writeHead(503); res.end(); });
  refusing.on('upgrade', (req, socket) => {
    upgrades += 1;
    socket.end('HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
  });
  await new Promise((resolve) => refusing.listen(state.port, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => refusing.close(resolve)));
  await new Promise((r) => setTimeout(r, 4000));
  // Waits of 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s (+ 3.2 s): five attempts in four seconds. Without
  // the backoff growing, one every 0.1 s: forty.
  assert.ok(upgrades >= 3 && upgrades <= 6, `${upgrades} attempts in 4 s`);
  assert.equal(ann.state === 'disconnected' || ann.state === 'connecting', true);
});


test('publishes made during an outage go out at the pace the server announced: each stored once, none refused', { timeout: 60000 }, async (t) => {
  const state = await fixture(t);
  const ann = new Client(state.server.ws, { name: 'ann', minDelay: 200, maxDelay: 1000 }).connect();
  t.after(() => ann.close());
  const { limits } = await once(ann, 'connected');
  const room = collector();
  const sub = ann.subscribe('room:backlog', room);
  await sub.publish({ text: 'before' });

  const gone = once(ann, 'disconnected');
  await state.server.stop();
  await gone;
  // Four times the server's burst, queued while it is down.
  const n = 8 * limits.commands_per_second;
  const queued = Array.from({ length: n }, (_, i) => sub.publish({ text: `b${i}` }));
  state.server = await serve(state.port, state.data);

  const results = await Promise.allSettled(queued);
  assert.deepEqual(results.filter((r) => r.status === 'rejected').map((r) => r.reason.message), []);
  await room.wait(n + 1, 30000);
  const texts = room.seen.map((p) => p.data.text);
  for (let i = 0; i < n; i += 1) {
    assert.equal(texts.filter((x) => x === `b${i}`).length, 1, `b${i} once`);
  }
  const offsets = results.map((r) => r.value.offset);
  assert.equal(new Set(offsets).size, n, 'each its own offset');
});
