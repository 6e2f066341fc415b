// WebSockets over HTTP/2 (RFC 8441) with clients no one here wrote: Debian's Chromium loading
// a page over TLS, and Node's own `http2` module speaking extended CONNECT and WebSocket frames
// by hand, against `tether serve`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http2 from 'node:http2';
import { randomBytes } from 'node:crypto';
import { launchChromium, selfSignedCertificate, startServe } from './helpers.mjs';

/** The value of one metric in a /metrics text. */
function metric(text, name) {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  assert.ok(line, `no ${name} in /metrics`);
  return Number(line.slice(name.length + 1));
}

/** Polls `GET /metrics` (HTTP/1.1, any certificate) until `ok(text)` holds; 15 s at most. */
async function metricsUntil(url, ok) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const text = await getText(`${url}/metrics`);
    if (ok(text)) return text;
    if (Date.now() > deadline) assert.fail(`/metrics never matched:\n${text}`);
    await new Promise((resolve) => { setTimeout(resolve, 20); });
  }
}

/** `GET url` over a fresh HTTP/2 session (h2c for http://, TLS trusting anything for https://). */
async function getText(url) {
  const session = http2.connect(url, { rejectUnauthorized: false });
  try {
    const { pathname } = new URL(url);
    const stream = session.request({ ':path': pathname });
    stream.setEncoding('utf8');
    let body = '';
    stream.on('data', (chunk) => { body += chunk; });
    await new Promise((resolve, reject) => { stream.on('end', resolve); stream.on('error', reject); });
    return body;
  } finally {
    session.close();
  }
}

/** A masked client frame (RFC 6455 §5.2): FIN set, `opcode`, `payload` (a Buffer). */
function clientFrame(opcode, payload) {
  const mask = randomBytes(4);
  const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
  let head;
  if (payload.length < 126) {
    head = Buffer.from([0x80 | opcode, 0x80 | payload.length]);
  } else {
    head = Buffer.alloc(4);
    head[0] = 0x80 | opcode;
    head[1] = 0x80 | 126;
    head.writeUInt16BE(payload.length, 2);
  }
  return Buffer.concat([head, mask, masked]);
}

/** Reads the server's (unmasked) frames from a stream: `next()` resolves with { opcode, payload }. */
function frameReader(stream) {
  let buffered = Buffer.alloc(0);
  const waiting = [];
  let ended = false;
  const parse = () => {
    while (waiting.length > 0) {
      if (buffered.length < 2) break;
      const masked = buffered[1] & 0x80;
      assert.equal(masked, 0, 'a server frame is not masked');
      let length = buffered[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (buffered.length < 4) break;
        length = buffered.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (buffered.length < 10) break;
        length = Number(buffered.readBigUInt64BE(2));
        offset = 10;
      }
      if (buffered.length < offset + length) break;
      const frame = { opcode: buffered[0] & 0x0f, fin: Boolean(buffered[0] & 0x80), payload: buffered.subarray(offset, offset + length) };
      buffered = buffered.subarray(offset + length);
      waiting.shift().resolve(frame);
    }
    if (ended) for (const w of waiting.splice(0)) w.reject(new Error('the stream ended'));
  };
  stream.on('data', (chunk) => { buffered = Buffer.concat([buffered, chunk]); parse(); });
  stream.on('end', () => { ended = true; parse(); });
  return {
    next: () => new Promise((resolve, reject) => { waiting.push({ resolve, reject }); parse(); }),
  };
}

/** An HTTP/2 session whose peer's settings have arrived (extended CONNECT needs them). */
async function session(url, options = {}) {
  const s = http2.connect(url, options);
  s.on('error', () => {}); // a GOAWAY the test provokes ends it; the test checks what it needs
  await new Promise((resolve, reject) => { s.once('remoteSettings', resolve); s.once('error', reject); });
  return s;
}

/** Opens an extended CONNECT to `path`; resolves with { stream, headers } once answered. */
function extendedConnect(s, authority, scheme, path, { protocol = 'websocket', extra = {} } = {}) {
  const headers = {
    ':method': 'CONNECT', ':scheme': scheme, ':path': path, ':authority': authority,
    'sec-websocket-version': '13', ...extra,
  };
  if (protocol !== null) headers[':protocol'] = protocol;
  const stream = s.request(headers, { endStream: false });
  return new Promise((resolve, reject) => {
    stream.once('response', (h) => resolve({ stream, headers: h }));
    stream.once('error', reject);
  });
}

test('Chromium opens the page\'s WebSockets as streams of its HTTP/2 connection, and over HTTP/1.1 when h2 is off', { timeout: 90000 }, async () => {
  const tls = selfSignedCertificate();
  for (const http2On of [true, false]) {
    const server = await startServe(['--tls-cert', tls.cert, '--tls-key', tls.key, '--http2', String(http2On)]);
    const browser = await launchChromium();
    try {
      const context = await browser.newContext({ ignoreHTTPSErrors: true });
      const page = await context.newPage();
      const origin = server.url.replace('127.0.0.1', 'localhost');
      await page.goto(`${origin}/console`);
      assert.equal(await page.inputValue('#ws-url'), `${origin.replace(/^http/, 'ws')}/ws/echo`);
      await page.click('#connect');
      await page.waitForSelector('#ready-state[data-state="OPEN"]');
      await page.fill('#text-input', 'over h2?');
      await page.click('#send-text');
      const echoed = await page.waitForSelector('#frame-log .frame[data-dir="in"][data-type="text"]');
      assert.equal(await echoed.$eval('.frame-data', (e) => e.textContent), 'over h2?');
      const metrics = await page.evaluate(async () => (await fetch('/metrics')).text());
      const sockets = metric(metrics, 'tether_connections_total');
      assert.ok(sockets >= 1, metrics);
      if (http2On) {
        // The page, its scripts, /metrics and every WebSocket came over one TCP connection.
        assert.equal(metric(metrics, 'tether_http_connections_total'), 1, metrics);
        assert.equal(metric(metrics, 'tether_http2_connections_total'), 1, metrics);
        assert.equal(metric(metrics, 'tether_http2_websockets_total'), sockets, metrics);
      } else {
        assert.equal(metric(metrics, 'tether_http2_connections_total'), 0, metrics);
        assert.equal(metric(metrics, 'tether_http2_websockets_total'), 0, metrics);
      }
    } finally {
      await browser.close();
      await server.stop();
    }
  }
});

test('Node\'s http2 client: an extended CONNECT to /ws/echo, masked frames echoed, and a close handshake that ends the stream (h2c and TLS)', { timeout: 60000 }, async () => {
  const tls = selfSignedCertificate();
  const servers = [
    { args: ['--h2c'], scheme: 'http', options: {} },
    { args: ['--tls-cert', tls.cert, '--tls-key', tls.key], scheme: 'https', options: { ca: tls.pem } },
  ];
  for (const { args, scheme, options } of servers) {
    const server = await startServe(args);
    const authority = new URL(server.url).host.replace('127.0.0.1', 'localhost');
    const s = await session(`${scheme}://${authority}`, options);
    try {
      assert.equal(s.remoteSettings.enableConnectProtocol, true, 'SETTINGS_ENABLE_CONNECT_PROTOCOL');
      const { stream, headers } = await extendedConnect(s, authority, scheme, '/ws/echo', {
        extra: { 'sec-websocket-protocol': 'not-offered-by-the-server' },
      });
      // RFC 8441 §5: a 200, without Sec-WebSocket-Accept, and no subprotocol it was not asked for.
      assert.equal(headers[':status'], 200);
      assert.equal(headers['sec-websocket-accept'], undefined);
      assert.equal(headers['sec-websocket-protocol'], undefined);
      const frames = frameReader(stream);
      const text = Buffer.from('hello from node:http2 ✓');
      stream.write(clientFrame(0x1, text));
      const big = randomBytes(40000);
      stream.write(clientFrame(0x2, big));
      const first = await frames.next();
      assert.deepEqual([first.opcode, first.payload.toString()], [0x1, text.toString()]);
      const second = await frames.next();
      assert.equal(second.opcode, 0x2);
      assert.ok(second.payload.equals(big), 'the binary echo is the same bytes');
      // Close 1000: the server answers with its Close and ends the stream.
      stream.write(clientFrame(0x8, Buffer.from([0x03, 0xe8])));
      const close = await frames.next();
      assert.deepEqual([close.opcode, close.payload.readUInt16BE(0)], [0x8, 1000]);
      await new Promise((resolve) => { if (stream.readableEnded) resolve(); else stream.once('end', resolve); });
      await metricsUntil(server.url, (t) => metric(t, 'tether_connections') === 0);
    } finally {
      s.close();
      await server.stop();
    }
  }
});

test('Node\'s http2 client: CONNECTs that are not WebSockets are refused, data before the 2xx is kept, and streams reset or abandoned end their WebSockets', { timeout: 60000 }, async () => {
  const server = await startServe(['--h2c']);
  const authority = new URL(server.url).host;
  const url = `http://${authority}`;
  const s = await session(url);
  try {
    // No :protocol: a tunnel request, not a WebSocket.
    const tunnel = s.request({ ':method': 'CONNECT', ':authority': authority }, { endStream: false });
    const tunnelStatus = await new Promise((resolve, reject) => {
      tunnel.once('response', (h) => resolve(h[':status']));
      tunnel.once('error', reject);
    });
    assert.ok(tunnelStatus >= 400 && tunnelStatus < 500, `CONNECT without :protocol: ${tunnelStatus}`);
    tunnel.close();
    const other = await extendedConnect(s, authority, 'http', '/ws/echo', { protocol: 'chat' });
    assert.equal(other.headers[':status'], 400, ':protocol other than websocket');
    other.stream.close();

    // A frame written with the request, before the answer: echoed once the WebSocket starts.
    const early = s.request({
      ':method': 'CONNECT', ':protocol': 'websocket', ':scheme': 'http', ':path': '/ws/echo',
      ':authority': authority, 'sec-websocket-version': '13',
    }, { endStream: false });
    early.write(clientFrame(0x1, Buffer.from('before the 200')));
    const frames = frameReader(early);
    const earlyStatus = await new Promise((resolve) => { early.once('response', (h) => resolve(h[':status'])); });
    assert.equal(earlyStatus, 200);
    assert.equal((await frames.next()).payload.toString(), 'before the 200');

    // Opened, answered, then dropped mid-message (RST_STREAM CANCEL): each WebSocket ends.
    const opened = [];
    for (let i = 0; i < 20; i++) opened.push(extendedConnect(s, authority, 'http', '/ws/echo'));
    for (const { stream } of await Promise.all(opened)) {
      stream.write(clientFrame(0x2, randomBytes(2000)).subarray(0, 1000)); // half a frame
    }
    await metricsUntil(url, (t) => metric(t, 'tether_connections') === 21);
    for (const { stream } of await Promise.all(opened)) stream.close(http2.constants.NGHTTP2_CANCEL);
    await metricsUntil(url, (t) => metric(t, 'tether_connections') === 1);
    early.close(http2.constants.NGHTTP2_CANCEL);
    await metricsUntil(url, (t) => metric(t, 'tether_connections') === 0);

    // Rapid reset (CVE-2023-44487): streams opened and reset at once, many times over. Each
    // costs the server its answer and no more (or the connection, should they pile up before
    // they are answered); the server goes on serving.
    const rapid = await session(url);
    let goaway = null;
    rapid.once('goaway', (code) => { goaway = code; });
    for (let i = 0; i < 500 && !rapid.closed && !rapid.destroyed; i++) {
      try {
        const stream = rapid.request({
          ':method': 'CONNECT', ':protocol': 'websocket', ':scheme': 'http', ':path': '/ws/echo',
          ':authority': authority, 'sec-websocket-version': '13',
        }, { endStream: false });
        stream.on('error', () => {});
        stream.close(http2.constants.NGHTTP2_CANCEL);
      } catch {
        break; // the session is going away
      }
    }
    // A PING is answered after every frame before it: all the resets have been read.
    if (!rapid.closed && !rapid.destroyed && goaway === null) {
      await new Promise((resolve) => { if (!rapid.ping(() => resolve())) resolve(); rapid.once('close', resolve); });
    }
    rapid.destroy();
    const text = await metricsUntil(url, (t) => metric(t, 'tether_connections') === 0);
    assert.ok(metric(text, 'tether_http2_connections_total') >= 2, text);
    const health = await fetch(`${url}/healthz`);
    assert.equal(health.status, 200, `after the rapid resets (GOAWAY: ${goaway})`);
  } finally {
    s.close();
    await server.stop();
  }
});

test('Node\'s http2 client: a stream that stops reading is dropped at the write deadline, and its connection goes on', { timeout: 60000 }, async () => {
  const server = await startServe(['--h2c', '--write-timeout', '1s']);
  const authority = new URL(server.url).host;
  const url = `http://${authority}`;
  // Streams open with a flow-control window of 0: the server may send nothing on them until
  // the client grants room, which it does not: each echo waits, whatever the client buffers.
  const s = await session(url, { settings: { initialWindowSize: 0 } });
  try {
    const { stream } = await extendedConnect(s, authority, 'http', '/ws/echo');
    for (let i = 0; i < 300; i++) stream.write(clientFrame(0x2, randomBytes(1000)));
    await metricsUntil(url, (t) => metric(t, 'tether_write_timeouts_total') === 1
      && metric(t, 'tether_connections') === 0);
    assert.ok(!s.closed && !s.destroyed, 'the connection stays');
    // Room for the streams to come (the settings' acknowledgement awaited).
    await new Promise((resolve) => { s.settings({ initialWindowSize: 65535 }, resolve); });
    const other = await extendedConnect(s, authority, 'http', '/ws/echo');
    const frames = frameReader(other.stream);
    other.stream.write(clientFrame(0x1, Buffer.from('still served')));
    assert.equal((await frames.next()).payload.toString(), 'still served');
    other.stream.close();
  } finally {
    s.close();
    await server.stop();
  }
});
