// `tether serve` in a real browser: the chat, polls and console pages it embeds, driven in
// Debian's Chromium against the HTTP API and WebSocket endpoints of docs/api.md. Every test
// starts its own server on a fresh data directory and saves screenshots to e2e/artifacts/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { addUser, artifact, freshDataDir, getToken, launchChromium, startServe } from './helpers.mjs';

const PASSWORD = 'correct horse battery staple';

/**
 * Runs in every page before its scripts: keeps each WebSocket the page opens in
 * window.__sockets, so a test can see the URLs it used and drop a connection.
 */
function trackSockets() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
  };
}

/**
 * Runs in a page: its address, connection states, sockets (URL and readyState) and the last
 * lines of its log, for the message of a failed test.
 */
function describePage() {
  const attr = (id, name) => document.getElementById(id)?.dataset[name] ?? null;
  return {
    href: location.href,
    conn: attr('conn-state', 'state') ?? attr('poll-conn-state', 'state') ?? attr('ready-state', 'state'),
    sockets: (window.__sockets ?? []).map((ws) => [ws.url, ws.readyState]),
    log: [...document.querySelectorAll('#messages > *, #frame-log > *')].slice(-8)
      .map((li) => `${li.className}#${li.dataset.id ?? ''}: ${li.textContent.trim().slice(0, 80)}`),
  };
}

/**
 * Adds `users` (password PASSWORD), starts `tether serve ARGS`, launches Chromium and runs
 * `fn({ server, open, restart })`; closes everything whatever happens. `open(label, options)`
 * makes a page in a new browser context (its own cookies and localStorage); an uncaught error
 * in any page fails the test. `restart()` stops the server and starts a new one on the same data.
 */
async function withServe({ users = [], args = [] }, fn) {
  const dataDir = freshDataDir();
  const extraDirs = [];
  const servers = [];
  let browser;
  try {
    for (const name of users) await addUser(dataDir, name, PASSWORD);
    const start = async () => {
      const server = await startServe(args, { dataDir });
      servers.push(server);
      return server;
    };
    const server = await start();
    browser = await launchChromium();
    const pageErrors = [];
    const consoleLines = [];
    const pages = [];
    const open = async (label, options = {}) => {
      const context = await browser.newContext(options);
      await context.addInitScript(trackSockets);
      const page = await context.newPage();
      page.setDefaultTimeout(15000);
      page.on('pageerror', (err) => pageErrors.push(`${label}: ${err.message}`));
      page.on('console', (msg) => {
        consoleLines.push(`${label} ${msg.type()}: ${msg.text()}`);
      });
      pages.push({ label, page });
      return page;
    };
    // `samePort`: the new server listens where the old one did (pages reconnect to it);
    // `freshData`: on a new data directory (the users added again), as if the old were lost.
    const restart = async ({ samePort = false, freshData = false } = {}) => {
      const last = servers.at(-1);
      await last.stop();
      if (!samePort && !freshData) return start();
      const dir = freshData ? freshDataDir() : dataDir;
      if (freshData) {
        extraDirs.push(dir);
        for (const name of users) await addUser(dir, name, PASSWORD);
      }
      const listen = samePort ? new URL(last.url).host : '127.0.0.1:0';
      const server = await startServe(args, { dataDir: dir, listen });
      servers.push(server);
      return server;
    };
    try {
      await fn({ server, open, restart });
    } catch (err) {
      // Say what every page showed when the test failed: a timeout alone explains nothing.
      const states = [];
      for (const { label, page } of pages) {
        if (page.isClosed()) continue;
        const state = await page.evaluate(describePage).catch((e) => `unreadable: ${e.message}`);
        states.push(`${label}: ${JSON.stringify(state)}`);
      }
      if (pageErrors.length) states.push(`page errors: ${JSON.stringify(pageErrors)}`);
      if (consoleLines.length) states.push(`console: ${JSON.stringify(consoleLines.slice(-10))}`);
      err.message += `\n${states.join('\n')}`;
      throw err;
    }
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the pages');
  } finally {
    await browser?.close();
    for (const server of servers) await server.stop();
    for (const dir of [dataDir, ...extraDirs]) rmSync(dir, { recursive: true, force: true });
  }
}

const screenshot = (page, name) => page.screenshot({ path: artifact(`${name}.png`), fullPage: true });

// ---------------------------------------------------------------------------------------------
// Chat helpers

/** Opens the chat page on ROOM, as guest NICK (omit it when logged in), and waits until live. */
async function joinChat(page, url, room, nick) {
  await page.goto(`${url}/#room=${room}`);
  await page.waitForSelector('#join-form');
  await page.fill('#room-input', room);
  if (nick) await page.fill('#nick', nick);
  await page.click('#join');
  await waitLive(page);
}

const waitLive = (page) => page.waitForSelector('#conn-state[data-state="live"]');

async function say(page, text) {
  await page.waitForSelector('#send:not([disabled])');
  await page.fill('#message-input', text);
  await page.press('#message-input', 'Enter');
}

/** The messages shown, in page order: { id, user, text, mine }. */
function shownMessages(page) {
  return page.$$eval('#messages .msg', (items) => items.map((li) => ({
    id: Number(li.dataset.id),
    user: li.dataset.user,
    text: li.querySelector('.msg-text').textContent,
    mine: li.dataset.mine === 'true',
  })));
}

/** Waits until exactly these texts are shown, in this order (and says what was shown if not). */
async function waitForTexts(page, texts) {
  try {
    await page.waitForFunction(
      (want) => JSON.stringify([...document.querySelectorAll('#messages .msg .msg-text')].map((p) => p.textContent)) === want,
      JSON.stringify(texts),
    );
  } catch (err) {
    const shown = (await shownMessages(page)).map((m) => m.text);
    throw new Error(`expected messages ${JSON.stringify(texts)}, page shows ${JSON.stringify(shown)}: ${err.message}`);
  }
}

async function waitForMessage(page, text, user) {
  await page.waitForFunction(
    ([t, u]) => [...document.querySelectorAll('#messages .msg')]
      .some((li) => li.querySelector('.msg-text')?.textContent === t && li.dataset.user === u),
    [text, user],
  );
}

async function waitForMembers(page, names) {
  const want = [...names].sort();
  try {
    await page.waitForFunction(
      (w) => JSON.stringify([...document.querySelectorAll('#members [data-user]')].map((li) => li.dataset.user).sort()) === w
        && document.getElementById('member-count').textContent === String(JSON.parse(w).length),
      JSON.stringify(want),
    );
  } catch (err) {
    const shown = await page.$$eval('#members [data-user]', (items) => items.map((li) => li.dataset.user));
    throw new Error(`expected members ${JSON.stringify(want)}, page shows ${JSON.stringify(shown)}: ${err.message}`);
  }
}

/** POST /api/rooms/{room}/messages with a bearer token; returns the stored message (201). */
async function publish(url, token, room, text) {
  const res = await fetch(`${url}/api/rooms/${room}/messages`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ text }),
  });
  const body = await res.json().catch(() => null);
  assert.equal(res.status, 201, `publish answered ${res.status}: ${JSON.stringify(body)}`);
  return body;
}

function assertIncreasingIds(messages) {
  for (let i = 1; i < messages.length; i++) {
    assert.ok(messages[i].id > messages[i - 1].id, `ids increase: ${messages.map((m) => m.id).join(', ')}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Chat

test('two guests chat in one room: each sees the other, presence lists both', { timeout: 90000 }, () =>
  withServe({}, async ({ server, open }) => {
    const ann = await open('ann');
    const ben = await open('ben', { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    await joinChat(ann, server.url, 'lobby', 'ann');
    await joinChat(ben, server.url, 'lobby', 'ben');
    await waitForMembers(ann, ['ann', 'ben']);
    await waitForMembers(ben, ['ann', 'ben']);

    await say(ann, 'hello from ann');
    await waitForMessage(ben, 'hello from ann', 'ann');
    await say(ben, 'hi ann, ben here');
    await waitForMessage(ann, 'hi ann, ben here', 'ben');
    await waitForTexts(ann, ['hello from ann', 'hi ann, ben here']);
    await waitForTexts(ben, ['hello from ann', 'hi ann, ben here']);

    const annSees = await shownMessages(ann);
    const benSees = await shownMessages(ben);
    assert.deepEqual(annSees.map((m) => [m.user, m.mine]), [['ann', true], ['ben', false]]);
    assert.deepEqual(benSees.map((m) => [m.user, m.mine]), [['ann', false], ['ben', true]]);
    assert.deepEqual(annSees.map((m) => m.id), benSees.map((m) => m.id));
    assertIncreasingIds(annSees);
    assert.equal(await ann.textContent('#room-title'), '#lobby');
    assert.equal(await ann.evaluate(() => location.hash), '#room=lobby');

    // The rooms list (GET /api/rooms) shows the room with its two members.
    await ann.waitForSelector('#rooms .room-link[data-room="lobby"]');

    await screenshot(ann, 'chat-ann');
    await screenshot(ben, 'chat-ben-phone');

    // Ben leaves: Ann's list follows the presence event.
    await ben.context().close();
    await waitForMembers(ann, ['ann']);
  }));

test('a message published with a bearer token appears in the page, as text', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    const ann = await open('ann');
    await joinChat(ann, server.url, 'news', 'ann');

    const text = 'Deploy at 5 <b>sharp</b> <img src=x onerror="window.__xss = 1">';
    const message = await publish(server.url, token, 'news', text);
    assert.equal(message.user, 'alice');
    assert.equal(message.text, text);
    assert.equal(message.room, 'news');

    await ann.waitForSelector(`#messages .msg[data-id="${message.id}"]`);
    const shown = (await shownMessages(ann)).find((m) => m.id === message.id);
    assert.deepEqual(shown, { id: message.id, user: 'alice', text, mine: false });
    assert.equal(await ann.$$eval('#messages img, #messages b', (found) => found.length), 0, 'user text is never markup');
    assert.equal(await ann.evaluate(() => window.__xss), undefined);

    const anonymous = await fetch(`${server.url}/api/rooms/news/messages`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ text: 'no token' }),
    });
    assert.equal(anonymous.status, 401);

    // A broadcast (POST /api/broadcast) shows as a notice, not a message.
    const res = await fetch(`${server.url}/api/broadcast`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ text: 'restart at noon' }),
    });
    assert.equal(res.status, 200);
    assert.ok((await res.json()).delivered >= 1);
    await ann.waitForFunction(() => [...document.querySelectorAll('#messages .notice[data-kind="broadcast"] .msg-text')]
      .some((p) => p.textContent === 'restart at noon'));

    // A bad client message gets an error event and the connection stays up.
    await ann.evaluate(() => window.__sockets.at(-1).send('{"not":"a message"}'));
    await ann.waitForSelector('#messages .notice[data-kind="error"]');
    await say(ann, 'still here');
    await waitForMessage(ann, 'still here', 'ann');
    assert.equal(await ann.evaluate(() => window.__sockets.length), 1, 'no reconnect was needed');

    await screenshot(ann, 'chat-api-message');
  }));

test('history: a late page sees earlier messages; reconnects resume without loss or duplicates', { timeout: 120000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open, restart }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    const posted = [];
    for (const text of ['one', 'two', 'three']) posted.push(await publish(server.url, token, 'history', text));

    const ann = await open('ann');
    await joinChat(ann, server.url, 'history', 'ann');
    await waitForTexts(ann, ['one', 'two', 'three']);
    const firstUrl = new URL(await ann.evaluate(() => window.__sockets.at(-1).url));
    assert.equal(firstUrl.searchParams.get('since'), null, 'a first join asks for the recent history');
    assert.equal(firstUrl.searchParams.get('name'), 'ann');

    // 1. The connection drops; a message is published meanwhile. The page reconnects on its
    //    own with ?since=LAST_ID and shows everything exactly once.
    const socketsBefore = await ann.evaluate(() => window.__sockets.length);
    await ann.evaluate(() => window.__sockets.at(-1).close(4000, 'test drops the connection'));
    posted.push(await publish(server.url, token, 'history', 'four'));
    await ann.waitForFunction((n) => window.__sockets.length > n, socketsBefore);
    await waitLive(ann);
    await waitForTexts(ann, ['one', 'two', 'three', 'four']);
    const resumeUrl = new URL(await ann.evaluate(() => window.__sockets.at(-1).url));
    const since = Number(resumeUrl.searchParams.get('since'));
    assert.ok(resumeUrl.searchParams.has('since') && since >= posted[2].id, `resumed with ${resumeUrl.search}`);

    // 2. The browser goes offline for a while; messages published meanwhile arrive once it
    //    is back.
    await ann.context().setOffline(true);
    await ann.waitForSelector('#conn-state[data-state="offline"]');
    posted.push(await publish(server.url, token, 'history', 'five'));
    posted.push(await publish(server.url, token, 'history', 'six'));
    await ann.context().setOffline(false);
    await waitLive(ann);
    const texts = ['one', 'two', 'three', 'four', 'five', 'six'];
    await waitForTexts(ann, texts);
    const annSees = await shownMessages(ann);
    assert.deepEqual(annSees.map((m) => m.id), posted.map((m) => m.id), 'every message once, in id order');
    assert.ok(annSees.every((m) => m.user === 'alice'));
    await screenshot(ann, 'chat-history-resumed');

    // 3. The server restarts on the same data directory: the page notices, and a page opened
    //    on the new server sees the whole history once.
    const next = await restart();
    await ann.waitForSelector('#conn-state[data-state="reconnecting"], #conn-state[data-state="connecting"]');
    const ben = await open('ben');
    await joinChat(ben, next.url, 'history', 'ben');
    await waitForTexts(ben, texts);
    assert.deepEqual((await shownMessages(ben)).map((m) => m.id), posted.map((m) => m.id));

    // The same history through the HTTP API, paged with since and limit.
    const all = await (await fetch(`${next.url}/api/rooms/history/messages`)).json();
    assert.deepEqual(all.map((m) => m.text), texts);
    const page = await (await fetch(`${next.url}/api/rooms/history/messages?since=${posted[1].id}&limit=2`)).json();
    assert.deepEqual(page.map((m) => m.text), ['three', 'four']);
    await screenshot(ben, 'chat-history-after-restart');
  }));

test('a server whose history was lost: the resuming page says so and shows what it holds now', { timeout: 120000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open, restart }) => {
    let token = await getToken(server.url, 'alice', PASSWORD);
    for (const text of ['old one', 'old two', 'old three']) await publish(server.url, token, 'reset', text);
    const ann = await open('ann');
    await joinChat(ann, server.url, 'reset', 'ann');
    await waitForTexts(ann, ['old one', 'old two', 'old three']);
    const socketsBefore = await ann.evaluate(() => window.__sockets.length);

    // The server comes back on the same port with an empty database: ids start again at 1, so
    // "new one" and "new two" are ids 1 and 2, below the page's last id (3).
    const next = await restart({ samePort: true, freshData: true });
    token = await getToken(next.url, 'alice', PASSWORD);
    for (const text of ['new one', 'new two']) await publish(next.url, token, 'reset', text);
    await ann.waitForSelector('#reconnect-now:not([hidden])');
    await ann.click('#reconnect-now');
    await ann.waitForFunction((n) => window.__sockets.length > n, socketsBefore);
    await waitLive(ann);
    const resumeUrl = new URL(await ann.evaluate(() => window.__sockets.at(-1).url));
    assert.equal(resumeUrl.searchParams.get('since'), '3', `resumed with ${resumeUrl.search}`);
    assert.match(resumeUrl.searchParams.get('epoch') ?? '', /^[0-9a-f]{16}$/, 'the epoch goes with the position');
    await waitForTexts(ann, ['new one', 'new two']);
    const notices = await ann.evaluate(() => document.querySelector('#messages').textContent);
    assert.match(notices, /history of this room was reset/);
    await screenshot(ann, 'chat-history-reset');
  }));

test('logging in through the page form makes chat messages carry the registered name', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const page = await open('alice');
    await page.goto(`${server.url}/#room=members`);
    await page.waitForSelector('#login-toggle', { state: 'visible' });
    assert.equal(await page.getAttribute('#conn-state', 'data-state'), 'offline', 'a guest without a nickname is asked for one');

    // A wrong password is refused with a message.
    await page.click('#login-toggle');
    await page.fill('#login-user', 'alice');
    await page.fill('#login-password', 'not the password');
    await page.click('#login-submit');
    await page.waitForFunction(() => document.getElementById('login-error').textContent.length > 0);
    assert.equal(await page.isVisible('#me'), false);

    await page.fill('#login-password', PASSWORD);
    await page.press('#login-password', 'Enter');
    await page.waitForFunction(() => document.getElementById('me-name').textContent === 'alice');
    assert.equal(await page.isVisible('#logout'), true);
    assert.equal(await page.isVisible('#nick-field'), false, 'no nickname is asked once logged in');
    const me = await page.evaluate(() => fetch('/api/me').then((r) => r.json()));
    assert.equal(me.user, 'alice');
    assert.equal(me.guest, false);

    // Logged in, the page joins the room from the hash on its own, identified by the cookie.
    await waitLive(page);
    const wsUrl = new URL(await page.evaluate(() => window.__sockets.at(-1).url));
    assert.equal(wsUrl.searchParams.get('name'), null, 'the cookie identifies, not ?name=');
    await say(page, 'hello as alice');
    await waitForMessage(page, 'hello as alice', 'alice');
    const mine = (await shownMessages(page)).find((m) => m.text === 'hello as alice');
    assert.equal(mine.mine, true);

    const ben = await open('ben');
    await joinChat(ben, server.url, 'members', 'ben');
    await waitForMessage(ben, 'hello as alice', 'alice');
    await waitForMembers(ben, ['alice', 'ben']);
    await waitForMembers(page, ['alice', 'ben']);
    await screenshot(page, 'chat-logged-in');

    // Logging out ends the session; the page goes back to asking for a nickname.
    await page.click('#logout');
    await page.waitForSelector('#login-toggle', { state: 'visible' });
    assert.equal(await page.evaluate(() => fetch('/api/me').then((r) => r.status)), 401);
    await page.waitForSelector('#conn-state[data-state="offline"]');
    assert.equal(await page.isVisible('#nick-field'), true);
    await screenshot(page, 'chat-logged-out');
  }));

// ---------------------------------------------------------------------------------------------
// Polls

const waitPollLive = (page) => page.waitForSelector('#poll-conn-state[data-state="live"]');

/**
 * Waits until the poll shows these counts and total. It polls from Node with a function (never a
 * string): the page's CSP has no 'unsafe-eval', so a string predicate fails whenever the wait has
 * to poll inside the page.
 */
async function waitForCounts(page, counts, total, timeoutMs = 15000) {
  const want = JSON.stringify({ counts, total: String(total) });
  const read = () => {
    const shown = {};
    for (const button of document.querySelectorAll('#poll-choices .choice')) shown[button.dataset.option] = Number(button.dataset.count);
    return JSON.stringify({ counts: shown, total: document.getElementById('poll-total').dataset.total });
  };
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const shown = await page.evaluate(read);
    if (shown === want) return;
    if (Date.now() > deadline) throw new Error(`expected ${want}, page shows ${shown} after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const pressed = (page) => page.$$eval('#poll-choices .choice[aria-pressed="true"]', (found) => found.map((b) => b.dataset.option));

test('a vote in one page updates the counts in another', { timeout: 90000 }, () =>
  withServe({}, async ({ server, open }) => {
    const ann = await open('ann', { colorScheme: 'dark' });
    const ben = await open('ben');

    // Ann creates a poll through the form and lands on it.
    await ann.goto(`${server.url}/polls`);
    await ann.fill('#poll-question', 'Lunch?');
    const options = ann.locator('#poll-options input');
    await options.nth(0).fill('pizza');
    await options.nth(1).fill('soup');
    await ann.click('#add-option');
    await options.nth(2).fill('salad');
    await ann.click('#poll-create');
    await ann.waitForFunction(() => location.hash.startsWith('#poll='));
    const id = new URLSearchParams((await ann.evaluate(() => location.hash)).slice(1)).get('poll');
    const created = await (await fetch(`${server.url}/api/polls/${id}`)).json();
    assert.equal(created.question, 'Lunch?');
    assert.deepEqual(created.options, ['pizza', 'soup', 'salad']);
    assert.equal(created.total, 0);

    await ann.fill('#nick', 'ann');
    await ann.click('#nick-save');
    await waitPollLive(ann);
    await ann.waitForSelector(`#polls-list a[data-poll-id="${id}"]`);

    await ben.goto(`${server.url}/polls#poll=${id}`);
    await ben.fill('#nick', 'ben');
    await ben.click('#nick-save');
    await waitPollLive(ben);
    assert.equal(await ben.textContent('#poll-title'), 'Lunch?');
    assert.deepEqual(await pressed(ben), []);

    await ben.click('#poll-choices .choice[data-option="soup"]');
    await waitForCounts(ann, { pizza: 0, soup: 1, salad: 0 }, 1);
    await waitForCounts(ben, { pizza: 0, soup: 1, salad: 0 }, 1);
    assert.deepEqual(await pressed(ben), ['soup']);
    assert.deepEqual(await pressed(ann), []);

    await ann.click('#poll-choices .choice[data-option="pizza"]');
    await waitForCounts(ben, { pizza: 1, soup: 1, salad: 0 }, 2);

    // A later vote replaces the earlier one.
    await ben.click('#poll-choices .choice[data-option="pizza"]');
    await waitForCounts(ann, { pizza: 2, soup: 0, salad: 0 }, 2);
    await waitForCounts(ben, { pizza: 2, soup: 0, salad: 0 }, 2);

    // The server remembers Ben's vote: a reload shows it.
    await ben.reload();
    await waitPollLive(ben);
    assert.deepEqual(await pressed(ben), ['pizza']);
    assert.equal(await ben.getAttribute('#poll-my-vote', 'data-vote'), 'pizza');
    const after = await (await fetch(`${server.url}/api/polls/${id}`)).json();
    assert.deepEqual(after.counts, { pizza: 2, soup: 0, salad: 0 });

    await screenshot(ann, 'polls-ann-dark');
    await screenshot(ben, 'polls-ben');
  }));

// ---------------------------------------------------------------------------------------------
// Console

test('the console connects to /ws/echo, sees its text and binary echoed, and disconnects', { timeout: 60000 }, () =>
  withServe({}, async ({ server, open }) => {
    const page = await open('console');
    await page.goto(`${server.url}/console`);
    assert.equal(await page.inputValue('#ws-url'), `${server.url.replace(/^http/, 'ws')}/ws/echo`);

    await page.click('#connect');
    await page.waitForSelector('#ready-state[data-state="OPEN"]');
    assert.equal(await page.textContent('#ready-state'), 'OPEN (1)');

    await page.fill('#text-input', 'hello echo ✓');
    await page.click('#send-text');
    const textIn = await page.waitForSelector('#frame-log .frame[data-dir="in"][data-type="text"]');
    assert.equal(await textIn.$eval('.frame-data', (e) => e.textContent), 'hello echo ✓');
    assert.equal(await textIn.getAttribute('data-size'), '14', 'size in UTF-8 bytes');

    await page.fill('#hex-input', 'de ad be ef 00');
    await page.click('#send-binary');
    const binaryIn = await page.waitForSelector('#frame-log .frame[data-dir="in"][data-type="binary"]');
    assert.equal(await binaryIn.$eval('.frame-data', (e) => e.textContent), 'de ad be ef 00');
    assert.equal(await binaryIn.getAttribute('data-size'), '5');

    await page.click('#disconnect');
    await page.waitForSelector('#ready-state[data-state="CLOSED"]');
    assert.equal(await page.textContent('#ready-state'), 'CLOSED (3)');
    await page.waitForSelector('#frame-log .frame[data-dir="in"][data-type="close"][data-code="1000"]');
    assert.equal(await page.isDisabled('#send-text'), true);
    await screenshot(page, 'console');
  }));
