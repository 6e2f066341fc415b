// A real browser's WebSocket against `tether echo`: Chromium offers permessage-deflate, tether
// accepts it, and text and binary messages from 0 B to 1 MiB come back intact.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startTether, launchChromium } from './helpers.mjs';

let server;
let browser;

before(async () => {
  server = await startTether(['echo', '--host', '127.0.0.1']);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  server?.stop();
});

test('Chromium negotiates permessage-deflate and round-trips text and binary up to 1 MiB', { timeout: 120000 }, async () => {
  const page = await browser.newPage();
  const result = await page.evaluate(async (url) => {
    const sizes = [0, 1, 125, 126, 1000, 65535, 65536, 300000, 1 << 20];
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error('connect failed')); });
    const replies = [];
    let waiting = null;
    ws.onmessage = (e) => { replies.push(e.data); if (waiting) { waiting(); waiting = null; } };
    const next = () => replies.length ? Promise.resolve(replies.shift())
      : new Promise((ok) => { waiting = () => ok(replies.shift()); });
    const failures = [];
    for (const size of sizes) {
      // Text: repetitive (compressible) with multi-byte characters.
      const text = 'tether ✓ κόσμε '.repeat(Math.ceil(size / 16) + 1).slice(0, size);
      ws.send(text);
      const echoed = await next();
      if (echoed !== text) failures.push(`text ${size}`);
      // Binary: a byte pattern that does not compress away.
      const bytes = new Uint8Array(size);
      for (let i = 0; i < size; i++) bytes[i] = (i * 7919 + (i >> 8)) & 0xff;
      ws.send(bytes);
      const back = new Uint8Array(await next());
      if (back.length !== size || back.some((b, i) => b !== bytes[i])) failures.push(`binary ${size}`);
    }
    const extensions = ws.extensions;
    const closed = new Promise((ok) => { ws.onclose = (e) => ok({ code: e.code, wasClean: e.wasClean }); });
    ws.close(1000, 'done');
    return { extensions, failures, close: await closed, count: sizes.length * 2 };
  }, server.url);
  console.log(`negotiated extension: ${result.extensions}`);
  assert.match(result.extensions, /^permessage-deflate/);
  assert.deepEqual(result.failures, []);
  assert.deepEqual(result.close, { code: 1000, wasClean: true });
  console.log(`round-tripped ${result.count} messages (0 B to 1 MiB), closed cleanly`);
});
