// `tether serve` in a real browser: the chat, polls and console pages it embeds, driven in
// Debian's Chromium against the HTTP API (docs/api.md) and the channel protocol on /ws
// (docs/protocol.md, spoken by clients/js through /assets/tether-client.js). Every test starts
// its own server on a fresh data directory and saves screenshots to e2e/artifacts/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { addUser, artifact, freshDataDir, getToken, launchChromium, startServe } from './helpers.mjs';

const PASSWORD = 'correct horse battery staple';

/**
 * Runs in every page before its scripts: keeps each WebSocket the page opens in
 * window.__sockets and every text it sends, parsed, in window.__sent, so a test can count the
 * connections, see the commands (a resume's `since`) and drop a connection.
 */
function trackSockets() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__sent = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }

    send(data) {
      if (typeof data === 'string') {
        try { window.__sent.push(JSON.parse(data)); } catch { /* not JSON: not ours */ }
      }
      super.send(data);
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
 * makes a page in a new browser context (its own cookies and localStorage; `nick` stores a guest
 * nickname as if chosen before); an uncaught error
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
    const open = async (label, { nick, ...options } = {}) => {
      const context = await browser.newContext(options);
      await context.addInitScript(trackSockets);
      // A guest nickname chosen earlier (the pages keep it in localStorage).
      if (nick) await context.addInitScript((n) => localStorage.setItem('tether.nick', n), nick);
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
    // `freshData`: on a new data directory (the users added again), as if the old were lost;
    // `whileDown`: awaited between the stop and the start.
    const restart = async ({ samePort = false, freshData = false, whileDown = null } = {}) => {
      const last = servers.at(-1);
      await last.stop();
      await whileDown?.();
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
  await page.waitForSelector('#join-form', { state: 'attached' });
  await joinRoom(page, room, nick);
}

/** Joins ROOM through the form (opening the drawer on a phone), as NICK when given. */
async function joinRoom(page, room, nick) {
  if (await page.isVisible('#drawer-toggle') && !(await page.isVisible('#join-form'))) {
    await page.click('#drawer-toggle');
    await page.waitForSelector('#join-form', { state: 'visible' });
  }
  await page.fill('#room-input', room);
  if (nick) await page.fill('#nick', nick);
  await page.click('#join');
  await waitLive(page);
  await page.waitForFunction((r) => document.getElementById('room-title').textContent === `#${r}`, room);
}

/** How many sockets the page opened with a guest name (not the one that watched before joining). */
const namedSockets = (page) => page.evaluate(() => window.__sockets.filter((ws) => new URL(ws.url).searchParams.has('name')).length);

const waitLive = (page) => page.waitForSelector('#conn-state[data-state="live"]', { timeout: 30000 });

/** The subscribe commands the page sent for CHANNEL, oldest first. */
const subscribesOf = (page, channel) => page.evaluate(
  (c) => window.__sent.filter((m) => m.op === 'subscribe' && m.channel === c),
  channel,
);

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

/** Waits for a broadcast notice with TEXT at the top of the page. */
async function waitForNotice(page, text) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#notices .notice-banner[role="status"] .notice-text')].some((n) => n.textContent === t),
    text,
  );
}

/** POST /api/broadcast {"text"} with a bearer token. */
async function broadcast(url, token, text) {
  const res = await fetch(`${url}/api/broadcast`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ text }),
  });
  assert.equal(res.status, 200);
  return res.json();
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
    await waitForNotice(ann, 'restart at noon');
    assert.equal(await ann.$$eval('#messages .msg', (items) => items.length), 1, 'a broadcast is not a message');

    await say(ann, 'still here');
    await waitForMessage(ann, 'still here', 'ann');
    assert.equal(await namedSockets(ann), 1, 'one connection throughout');

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
    assert.equal(firstUrl.pathname, '/ws');
    assert.equal(firstUrl.searchParams.get('name'), 'ann');
    const [first] = await subscribesOf(ann, 'room:history');
    assert.equal(first.since, undefined, 'a first join asks for the recent history');

    // 1. The connection drops; a message is published meanwhile. The page reconnects on its
    //    own, resubscribes with since=LAST_OFFSET and shows everything exactly once.
    const socketsBefore = await ann.evaluate(() => window.__sockets.length);
    await ann.evaluate(() => window.__sockets.at(-1).close(4000, 'test drops the connection'));
    posted.push(await publish(server.url, token, 'history', 'four'));
    await ann.waitForFunction((n) => window.__sockets.length > n, socketsBefore);
    await waitLive(ann);
    await waitForTexts(ann, ['one', 'two', 'three', 'four']);
    const resume = (await subscribesOf(ann, 'room:history')).at(-1);
    assert.ok(resume.since >= posted[2].id && typeof resume.epoch === 'string', `resumed with ${JSON.stringify(resume)}`);

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

    // The server comes back on the same port with an empty database: offsets start again at 1,
    // so "new one" and "new two" are 1 and 2, below the page's last offset (3), in a new epoch.
    const next = await restart({ samePort: true, freshData: true });
    token = await getToken(next.url, 'alice', PASSWORD);
    for (const text of ['new one', 'new two']) await publish(next.url, token, 'reset', text);
    // The client comes back by itself; "Reconnect now" skips what is left of its backoff.
    await ann.click('#reconnect-now', { timeout: 3000 }).catch(() => {});
    await ann.waitForFunction((n) => window.__sockets.length > n, socketsBefore);
    await waitLive(ann);
    await waitForTexts(ann, ['new one', 'new two']);
    const resume = (await subscribesOf(ann, 'room:reset')).at(-1);
    assert.equal(resume.since, 3, `resumed with ${JSON.stringify(resume)}`);
    assert.match(resume.epoch ?? '', /^[0-9a-f]{16}$/, 'the epoch goes with the position');
    const notices = await ann.evaluate(() => document.querySelector('#messages').textContent);
    assert.match(notices, /could not be recovered/);
    await screenshot(ann, 'chat-history-reset');
  }));

test('"Reconnect now" skips the backoff: the page is back at once, and what was written meanwhile is sent once', { timeout: 120000 }, () =>
  withServe({}, async ({ server, open, restart }) => {
    const ann = await open('ann');
    // The longest backoff every time (full jitter at its ceiling): 0.5, 1, 2, 4, 8, then 16 s.
    await ann.context().addInitScript(() => { Math.random = () => 0.999; });
    await joinChat(ann, server.url, 'rn', 'ann');
    await say(ann, 'before');
    await waitForMessage(ann, 'before', 'ann');
    const sockets = await ann.evaluate(() => window.__sockets.length);
    let failedAt = 0;
    await restart({
      samePort: true,
      whileDown: async () => {
        // Five attempts fail: the next waits 16 s, far longer than the restart and the click
        // take even on a busy machine.
        await ann.waitForFunction((n) => window.__sockets.length >= n + 5 && window.__sockets.at(-1).readyState === 3,
          sockets, { timeout: 40000 });
        failedAt = Date.now();
        await ann.waitForSelector('#conn-state[data-state="reconnecting"]');
        await say(ann, 'while away'); // held by the client until it is back
      },
    });
    // The sixth attempt is due 16 s after the fifth failed. On a machine so busy that the
    // restart took most of that, the client may have tried again by itself: what follows then
    // still checks that the page comes back and sends once, but not that the click was faster.
    const before = await ann.evaluate(() => window.__sockets.length);
    const clickedAt = Date.now();
    const timely = clickedAt - failedAt < 10000;
    const clicked = timely || await ann.isVisible('#reconnect-now');
    if (clicked) await ann.click('#reconnect-now');
    await ann.waitForFunction((n) => window.__sockets.length > n && window.__sockets.at(-1).readyState === 1,
      clicked ? before : sockets, { timeout: 15000 });
    const backAt = Date.now();
    const timing = `restarted ${clickedAt - failedAt} ms after the last failure, back ${backAt - failedAt} ms after it`;
    if (timely) {
      assert.equal(before, sockets + 5, `no attempt of its own before the click (${timing})`);
      assert.equal(await ann.evaluate(() => window.__sockets.length), sockets + 6, `one socket for the click (${timing})`);
      assert.ok(backAt - failedAt < 15000, `the backoff was not skipped: ${timing}`);
    }
    await waitLive(ann);
    assert.equal(await ann.isVisible('#reconnect-now'), false);
    await waitForTexts(ann, ['before', 'while away']);
    assert.equal((await ann.evaluate(() => window.__sent.filter((m) => m.op === 'publish'))).length, 2, 'each sent once');
  }));

test('leaving a room and joining it again at once, its subscribe still on its way: the room works, nothing refused', { timeout: 90000 }, () =>
  withServe({}, async ({ server, open }) => {
    const ben = await open('ben');
    await joinChat(ben, server.url, 'again', 'ben');
    const ann = await open('ann');
    await joinChat(ann, server.url, 'lobby', 'ann');
    // Join, leave and join again in one go: the first subscribe's reply has not come yet.
    await ann.evaluate(() => {
      const join = (room) => {
        document.getElementById('room-input').value = room;
        document.getElementById('join-form').requestSubmit();
      };
      join('again');
      document.querySelector('#open-rooms [data-room="again"] .leave-room').click();
      join('again');
    });
    await ann.waitForFunction(() => document.getElementById('room-title').textContent === '#again');
    await waitForMembers(ann, ['ann', 'ben']);
    await waitForMembers(ben, ['ann', 'ben']);
    const ops = await ann.evaluate(() => window.__sent.filter((m) => m.channel === 'room:again').map((m) => m.op));
    assert.deepEqual(ops, ['subscribe', 'unsubscribe', 'subscribe']);
    await say(ben, 'hi ann');
    await waitForTexts(ann, ['hi ann']);
    await say(ann, 'hi ben');
    await waitForTexts(ben, ['hi ann', 'hi ben']);
    await waitForTexts(ann, ['hi ann', 'hi ben']);
    const shown = await ann.textContent('#messages');
    assert.doesNotMatch(shown, /refused/, 'no refusal (105: already subscribed)');

    // Leaving for real: ben sees ann go.
    await ann.click('#open-rooms [data-room="again"] .leave-room');
    await waitForMembers(ben, ['ben']);
  }));

test('logging in through the page form makes chat messages carry the registered name', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const page = await open('alice');
    await page.goto(`${server.url}/#room=members`);
    await page.waitForSelector('#login-toggle', { state: 'visible' });
    // A guest without a nickname watches, and is asked for one.
    await page.waitForSelector('#conn-state[data-state="watching"]');
    assert.match(await page.textContent('#join-bar-text'), /Choose a nickname to join/);

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
    assert.equal(await page.textContent('#room-title'), '#members');
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
    assert.deepEqual(await page.evaluate(() => fetch('/api/me').then((r) => r.json())), { user: null, guest: true, guests: true });
    await page.waitForSelector('#conn-state[data-state="watching"]');
    assert.equal(await page.isVisible('#nick-field'), true);
    await screenshot(page, 'chat-logged-out');
  }));


test('several rooms on one connection: unread counts on the rooms not shown, one socket throughout', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    const ann = await open('ann');
    await joinChat(ann, server.url, 'a', 'ann');
    await joinRoom(ann, 'b');
    await ann.waitForSelector('#open-rooms [data-room="a"] .room-link:not([aria-current])');
    await ann.waitForSelector('#open-rooms [data-room="b"] .room-link[aria-current="true"]');

    // Messages reach both rooms; the one not shown counts them.
    await publish(server.url, token, 'a', 'for room a');
    await publish(server.url, token, 'b', 'for room b');
    await waitForTexts(ann, ['for room b']);
    await publish(server.url, token, 'a', 'a again');
    await ann.waitForSelector('#open-rooms [data-room="a"] .unread[data-unread="2"]');
    assert.equal(await ann.isVisible('#open-rooms [data-room="b"] .unread'), false, 'nothing unread in the room shown');
    assert.match(await ann.title(), /^\(2\) #b/);
    await screenshot(ann, 'chat-two-rooms');

    // Switching shows room a with both messages and clears its count, without reconnecting.
    await ann.click('#open-rooms [data-room="a"] .room-link');
    await ann.waitForFunction(() => document.getElementById('room-title').textContent === '#a');
    await waitForTexts(ann, ['for room a', 'a again']);
    assert.equal(await ann.isVisible('#open-rooms [data-room="a"] .unread'), false, 'read on switching');
    assert.equal(await ann.evaluate(() => location.hash), '#room=a');
    await say(ann, 'ann in a');
    await waitForMessage(ann, 'ann in a', 'ann');
    await publish(server.url, token, 'b', 'b again');
    await ann.waitForSelector('#open-rooms [data-room="b"] .unread[data-unread="1"]');
    await ann.click('#open-rooms [data-room="b"] .room-link');
    await waitForTexts(ann, ['for room b', 'b again']);

    assert.equal(await namedSockets(ann), 1, 'one WebSocket the whole time');
    assert.equal((await subscribesOf(ann, 'room:a')).length, 1);
    assert.equal((await subscribesOf(ann, 'room:b')).length, 1);

    // Leaving a room unsubscribes it; the other stays.
    await ann.click('#open-rooms [data-room="a"] .leave-room');
    await ann.waitForSelector('#open-rooms [data-room="a"]', { state: 'detached' });
    assert.ok(await ann.evaluate(() => window.__sent.some((m) => m.op === 'unsubscribe' && m.channel === 'room:a')));
    assert.equal(await ann.textContent('#room-title'), '#b');
  }));

test('typing: the other page shows "ann is typing…" until ann sends', { timeout: 90000 }, () =>
  withServe({}, async ({ server, open }) => {
    const ann = await open('ann');
    const ben = await open('ben');
    await joinChat(ann, server.url, 'typing', 'ann');
    await joinChat(ben, server.url, 'typing', 'ben');
    await waitForMembers(ann, ['ann', 'ben']);
    await waitForMembers(ben, ['ann', 'ben']);

    await ann.locator('#message-input').pressSequentially('hello b', { delay: 30 });
    await ben.waitForFunction(() => document.getElementById('typing').textContent === 'ann is typing…');
    assert.equal(await ann.textContent('#typing'), '', 'one does not see oneself typing');
    await screenshot(ben, 'chat-typing');
    await ann.press('#message-input', 'Enter');
    await waitForMessage(ben, 'hello b', 'ann');
    await ben.waitForFunction(() => document.getElementById('typing').textContent === '');
    const typing = await ann.evaluate(() => window.__sent.filter((m) => m.op === 'event' && m.name === 'typing').map((m) => m.data.on));
    assert.equal(typing[0], true);
    assert.equal(typing.at(-1), false, 'sending says typing stopped');
    assert.ok(typing.length <= 3, `typing events are throttled: ${typing}`);
  }));

test('links in messages are clickable (http and https only) and open safely', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    const ann = await open('ann');
    await joinChat(ann, server.url, 'links', 'ann');
    const text = 'see https://example.org/a_(b)?q=1, http://x.test/path. and javascript:alert(1) or ftp://no.test';
    await publish(server.url, token, 'links', text);
    await waitForTexts(ann, [text]);
    const links = await ann.$$eval('#messages .msg-text a', (as) => as.map((a) => [a.getAttribute('href'), a.textContent, a.target, a.rel]));
    assert.deepEqual(links, [
      ['https://example.org/a_(b)?q=1', 'https://example.org/a_(b)?q=1', '_blank', 'noopener noreferrer'],
      ['http://x.test/path', 'http://x.test/path', '_blank', 'noopener noreferrer'],
    ]);
  }));

test('a message over the limit is refused before sending and the draft is kept', { timeout: 90000 }, () =>
  withServe({}, async ({ server, open }) => {
    const ann = await open('ann');
    await joinChat(ann, server.url, 'limits', 'ann');
    const long = `${'long words '.repeat(181)}!`; // 1,992 characters, then 2,001
    await ann.fill('#message-input', `${long}123456789`);
    await ann.waitForSelector('#char-count.over');
    await ann.press('#message-input', 'Enter');
    await ann.waitForFunction(() => /2,000/.test(document.getElementById('composer-error').textContent));
    assert.equal(await ann.inputValue('#message-input'), `${long}123456789`, 'the draft stays');
    assert.equal(await ann.getAttribute('#message-input', 'aria-invalid'), 'true');
    assert.equal(await ann.evaluate(() => window.__sent.filter((m) => m.op === 'publish').length), 0, 'nothing was sent');

    // Shortened to the limit, it goes.
    await ann.fill('#message-input', `${long}1234567`);
    await ann.press('#message-input', 'Enter');
    await waitForTexts(ann, [`${long}1234567`]);
    assert.equal(await ann.textContent('#composer-error'), '');
    assert.equal(await ann.inputValue('#message-input'), '');
  }));

test('a taken nickname is said once and the page does not retry', { timeout: 90000 }, () =>
  withServe({}, async ({ server, open }) => {
    const ann = await open('ann');
    await joinChat(ann, server.url, 'lobby', 'ann');
    const other = await open('other ann');
    await other.goto(`${server.url}/#room=lobby`);
    await other.fill('#nick', 'ann');
    await other.click('#join');
    await other.waitForFunction(() => /taken/.test(document.getElementById('conn-problem').textContent));
    await other.waitForSelector('#conn-state[data-state="offline"][data-stopped="true"]');
    // Retrying cannot help: no more connections over a few seconds.
    await new Promise((resolve) => setTimeout(resolve, 4000));
    assert.equal(await namedSockets(other), 1, 'no reconnect loop');
    assert.equal(await other.evaluate(() => [...document.querySelectorAll('[role="alert"]')]
      .filter((n) => /taken/.test(n.textContent)).length), 1, 'said once');
    assert.equal(await other.isVisible('#reconnect-now'), false);
    await screenshot(other, 'chat-name-taken');

    // Another nickname works.
    await other.fill('#nick', 'ann2');
    await other.click('#join');
    await waitLive(other);
    await waitForMembers(other, ['ann', 'ann2']);
    assert.equal(await other.textContent('#conn-problem'), '');
  }));

test('with guests off the page asks to log in, offers no nickname and only watches', { timeout: 90000 }, () =>
  withServe({ users: ['alice'], args: ['--guests', 'false'] }, async ({ server, open }) => {
    const page = await open('visitor', { nick: 'ann' });
    await page.goto(`${server.url}/#room=lobby`);
    await page.waitForSelector('#guests-off', { state: 'visible' });
    assert.match(await page.textContent('#guests-off'), /log in/);
    assert.equal(await page.isVisible('#nick-field'), false, 'no nickname field');
    // A guest connection would be refused: the page only watches (broadcasts), without a name.
    await page.waitForSelector('#conn-state[data-state="watching"]');
    const sockets = await page.evaluate(() => window.__sockets.map((ws) => ws.url));
    assert.equal(sockets.length, 1);
    assert.equal(new URL(sockets[0]).searchParams.get('name'), null);
    assert.match(await page.textContent('#join-bar-text'), /log in to join/);
    await screenshot(page, 'chat-guests-off');
    await page.click('#join-bar-button');
    await page.waitForFunction(() => document.activeElement?.id === 'login-user');

    await page.fill('#login-user', 'alice');
    await page.fill('#login-password', PASSWORD);
    await page.press('#login-password', 'Enter');
    await waitLive(page);
    await say(page, 'members only');
    await waitForMessage(page, 'members only', 'alice');
  }));

test('the chat layout on a phone: conversation first, composer on screen, rooms and people in a drawer', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    for (let i = 1; i <= 30; i++) await publish(server.url, token, 'lobby', `message ${i}`);
    const phone = await open('phone', { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, nick: 'pia' });
    await phone.goto(`${server.url}/#room=lobby`);
    await waitLive(phone);
    await phone.waitForSelector('#messages .msg >> text=message 30');

    // The conversation is what shows: the drawer is shut, the composer is within the screen and
    // only the message list scrolls.
    assert.equal(await phone.isVisible('#sidebar'), false);
    assert.equal(await phone.isVisible('#members'), false);
    const inView = (selector) => phone.$eval(selector, (node) => {
      const r = node.getBoundingClientRect();
      return r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0 && r.right <= window.innerWidth && r.height > 0;
    });
    assert.ok(await inView('#message-input'), 'the composer is on screen');
    assert.ok(await inView('#send'));
    assert.ok(await inView('#drawer-toggle'));
    assert.ok(await inView('#messages'));
    assert.equal(await phone.evaluate(() => document.scrollingElement.scrollHeight <= window.innerHeight), true, 'the page itself does not scroll');
    assert.equal(await phone.evaluate(() => {
      const box = document.getElementById('messages');
      return box.scrollHeight > box.clientHeight && box.scrollTop + box.clientHeight >= box.scrollHeight - 2;
    }), true, 'the messages scroll inside, at the newest');
    await phone.screenshot({ path: artifact('chat-mobile.png') });

    // The drawer: rooms and people; focus moves in; Escape closes it and focus comes back.
    await phone.click('#drawer-toggle');
    await phone.waitForSelector('#sidebar', { state: 'visible' });
    assert.equal(await phone.getAttribute('#drawer-toggle', 'aria-expanded'), 'true');
    await phone.waitForSelector('#open-rooms [data-room="lobby"]', { state: 'visible' });
    await phone.waitForSelector('#members [data-user="pia"]', { state: 'visible' });
    assert.equal(await phone.evaluate(() => document.getElementById('sidebar').contains(document.activeElement)), true, 'focus is in the drawer');
    await phone.waitForFunction(() => document.getElementById('sidebar').getBoundingClientRect().left >= 0);
    await phone.screenshot({ path: artifact('chat-mobile-drawer.png') });
    await phone.keyboard.press('Escape');
    await phone.waitForSelector('#sidebar', { state: 'hidden' });
    assert.equal(await phone.getAttribute('#drawer-toggle', 'aria-expanded'), 'false');
    assert.equal(await phone.evaluate(() => document.activeElement?.id), 'drawer-toggle');

    // The scrim closes it too; picking a room there shows it and closes the drawer.
    await phone.click('#drawer-toggle');
    await phone.waitForSelector('#scrim', { state: 'visible' });
    await phone.mouse.click(380, 600);
    await phone.waitForSelector('#sidebar', { state: 'hidden' });
    await joinRoom(phone, 'second');
    await phone.waitForSelector('#sidebar', { state: 'hidden' });
    assert.ok(await inView('#message-input'));
    await say(phone, 'from the phone');
    await waitForMessage(phone, 'from the phone', 'pia');
  }));

const PHONE = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true };

/** The active rooms as listed: [[name, count], …] in page order. */
const listedRooms = (page) => page.$$eval('#rooms .room-link', (links) => links.map((a) => [a.dataset.room, Number(a.querySelector('.badge').textContent)]));

const DESKTOP = { viewport: { width: 1280, height: 900 } };

/** Opens the chat's drawer on a phone and waits until it has slid in. */
async function openDrawer(page) {
  await page.click('#drawer-toggle');
  await page.waitForFunction(() => getComputedStyle(document.getElementById('sidebar')).transform === 'none');
}

for (const [size, options] of [['desktop', DESKTOP], ['phone', PHONE]]) {
  test(`before joining (${size}): a visitor reads the room, sees broadcasts and the busiest rooms, and is asked for a nickname`, { timeout: 120000 }, () =>
    withServe({ users: ['alice'] }, async ({ server, open }) => {
      const token = await getToken(server.url, 'alice', PASSWORD);
      for (const text of ['welcome to the lobby', 'the agenda is pinned', 'see you at noon']) await publish(server.url, token, 'lobby', text);
      // A room with history and nobody in it, one with one person, one with two.
      await publish(server.url, token, 'archive', 'old news');
      for (const [nick, room] of [['cal', 'calm'], ['bea', 'busy'], ['bob', 'busy']]) {
        const page = await open(nick);
        await joinChat(page, server.url, room, nick);
      }

      const visitor = await open(`visitor-${size}`, options);
      await visitor.goto(`${server.url}/#room=lobby`);
      // The room's history, read before joining; nothing to write with yet, and why.
      await waitForTexts(visitor, ['welcome to the lobby', 'the agenda is pinned', 'see you at noon']);
      await visitor.waitForSelector('#join-bar', { state: 'visible' });
      assert.match(await visitor.textContent('#join-bar-text'), /reading #lobby\. Choose a nickname to join/);
      assert.equal(await visitor.textContent('#join-bar-button'), 'Join #lobby');
      assert.equal(await visitor.isVisible('#composer'), false, 'no composer before joining');
      assert.doesNotMatch(await visitor.innerText('#room'), /Choose a room/);
      // Connected without a name: broadcasts come from the first second.
      await visitor.waitForSelector('#conn-state[data-state="watching"]');
      const sockets = await visitor.evaluate(() => window.__sockets.map((ws) => ws.url));
      assert.equal(sockets.length, 1);
      assert.equal(new URL(sockets[0]).searchParams.get('name'), null, 'no name on the watching connection');
      await broadcast(server.url, token, 'welcome, visitors');
      await waitForNotice(visitor, 'welcome, visitors');

      // Rooms with people, busiest first; the room nobody is in is not listed as active.
      await visitor.waitForFunction(() => document.querySelectorAll('#rooms .room-link').length === 2);
      await screenshot(visitor, `chat-before-joining-${size}`);
      if (size === 'phone') await openDrawer(visitor);
      assert.deepEqual(await listedRooms(visitor), [['busy', 2], ['calm', 1]]);
      assert.equal(await visitor.textContent('#member-count'), '0');
      assert.equal(await visitor.isVisible('#members-hint'), true);
      if (size === 'phone') {
        await screenshot(visitor, 'chat-before-joining-phone-drawer');
        await visitor.click('#drawer-close');
      }

      // The join bar leads to the nickname; joining shows the same history once, then live.
      await visitor.click('#join-bar-button');
      await visitor.waitForFunction(() => document.activeElement?.id === 'nick');
      await visitor.fill('#nick', 'vic');
      await visitor.click('#join');
      await waitLive(visitor);
      await waitForTexts(visitor, ['welcome to the lobby', 'the agenda is pinned', 'see you at noon']);
      await visitor.waitForSelector('#composer', { state: 'visible' });
      await say(visitor, 'hello from vic');
      await waitForMessage(visitor, 'hello from vic', 'vic');
      // A guest's message says so; a registered user's does not.
      assert.equal(await visitor.getAttribute('#messages .msg[data-user="vic"]', 'data-guest'), 'true');
      assert.equal(await visitor.isVisible('#messages .msg[data-user="vic"] .guest-tag'), true);
      assert.equal(await visitor.getAttribute('#messages .msg[data-user="alice"]', 'data-guest'), 'false');
      assert.equal(await visitor.locator('#messages .msg[data-user="alice"] .guest-tag').count(), 0);
      // The list counts the room shown as "Here now" does.
      if (size === 'phone') await visitor.click('#drawer-toggle');
      await waitForMembers(visitor, ['vic']);
      await visitor.waitForFunction(() => document.querySelector('#rooms .room-link[data-room="lobby"] .badge')?.textContent === '1');
      // Lobby, with as many people as calm, has messages: it is the more active.
      assert.deepEqual(await listedRooms(visitor), [['busy', 2], ['lobby', 1], ['calm', 1]]);
      const shown = await shownMessages(visitor);
      assertIncreasingIds(shown);
    }));
}

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

for (const [size, options] of [['desktop', DESKTOP], ['phone', PHONE]]) {
  test(`polls for a guest without a nickname (${size}): one clear way to vote, and counts live`, { timeout: 90000 }, () =>
    withServe({ users: ['alice'] }, async ({ server, open }) => {
      const token = await getToken(server.url, 'alice', PASSWORD);
      const poll = await createPoll(server.url, token, 'Where do we meet?', ['café', 'park', 'library']);
      const guest = await open(`guest-${size}`, options);
      // Nothing red in a guest's console: not being logged in is no error (GET /api/me).
      const errors = [];
      guest.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
      await guest.goto(`${server.url}/polls#poll=${poll.id}`);
      await guest.waitForSelector('#poll-conn-state[data-state="live"]');
      await guest.waitForSelector('#nick-form', { state: 'visible' });
      await guest.waitForFunction(() => document.getElementById('poll-title').textContent === 'Where do we meet?');
      // One message: choose a nickname (or log in). Nothing says only registered users vote.
      const text = await guest.innerText('#poll-body');
      assert.doesNotMatch(text, /Only registered|only logged-in/i, text);
      assert.equal(await guest.textContent('#poll-my-vote'), '');
      assert.equal(await guest.isVisible('#login-to-vote'), false);
      assert.equal(await guest.locator('#poll-choices .choice:not([disabled])').count(), 0, 'no vote without a name');
      // Watching, the counts still move.
      const voter = await open('voter', { nick: 'vot' });
      await voter.goto(`${server.url}/polls#poll=${poll.id}`);
      await waitPollLive(voter);
      await voter.click('#poll-choices .choice[data-option="park"]');
      await waitForCounts(guest, { 'café': 0, park: 1, library: 0 }, 1);
      // The bar has grown to its new length (it slides there).
      await guest.waitForFunction(() => {
        const fill = document.querySelector('#poll-choices .choice[data-option="park"] .choice-fill');
        return Math.abs(fill.getBoundingClientRect().width - fill.parentElement.getBoundingClientRect().width) < 1;
      });
      await screenshot(guest, `polls-guest-${size}`);

      await guest.fill('#nick', 'gus');
      await guest.click('#nick-save');
      await waitPollLive(guest);
      await guest.click('#poll-choices .choice[data-option="café"]');
      await waitForCounts(voter, { 'café': 1, park: 1, library: 0 }, 2);
      assert.match(await guest.textContent('#poll-my-vote'), /Your vote: café/);
      assert.deepEqual(errors, [], 'no errors in the console');
    }));
}

/** POST /api/polls with a bearer token; returns the poll (201). */
async function createPoll(url, token, question, options) {
  const res = await fetch(`${url}/api/polls`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ question, options }),
  });
  const body = await res.json().catch(() => null);
  assert.equal(res.status, 201, `create poll answered ${res.status}: ${JSON.stringify(body)}`);
  return body;
}

test('the poll list updates live: a poll created elsewhere appears without a reload', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    const old = await createPoll(server.url, token, 'Old question?', ['yes', 'no']);
    const page = await open('viewer', { nick: 'vic' });
    await page.goto(`${server.url}/polls`);
    await page.waitForSelector(`#polls-list a[data-poll-id="${old.id}"]`);
    await page.waitForSelector('#polls-live', { state: 'visible' });
    assert.equal((await subscribesOf(page, 'polls')).length, 1);

    const created = await createPoll(server.url, token, 'Tea or coffee?', ['tea', 'coffee']);
    await page.waitForSelector(`#polls-list li:first-child a[data-poll-id="${created.id}"]`);
    assert.equal(await page.textContent(`#polls-list a[data-poll-id="${created.id}"] .poll-question`), 'Tea or coffee?');
    assert.equal(await page.$$eval('#polls-list li', (items) => items.length), 2);

    // Opened from the list, on the same connection, and voted in.
    await page.click(`#polls-list a[data-poll-id="${created.id}"]`);
    await waitPollLive(page);
    await page.click('#poll-choices .choice[data-option="tea"]');
    await waitForCounts(page, { tea: 1, coffee: 0 }, 1);
    assert.equal(await page.evaluate(() => window.__sockets.length), 1, 'one WebSocket for the list and the poll');
    await screenshot(page, 'polls-live-list');
  }));

test('a broadcast shows as a dismissable notice on the chat, polls and console pages, named or not', { timeout: 90000 }, () =>
  withServe({ users: ['alice'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alice', PASSWORD);
    const chat = await open('chat');
    await joinChat(chat, server.url, 'lobby', 'ann');
    const polls = await open('polls', { nick: 'pol' });
    await polls.goto(`${server.url}/polls`);
    await polls.waitForSelector('#poll-conn-state[data-state="live"]');
    const consolePage = await open('console', { nick: 'con' });
    await consolePage.goto(`${server.url}/console`);
    await consolePage.waitForFunction(() => window.__sockets.some((ws) => new URL(ws.url).pathname === '/ws' && ws.readyState === 1));
    // A visitor who has no nickname and has not logged in watches all the same.
    const visitor = await open('visitor');
    await visitor.goto(`${server.url}/polls`);
    await visitor.waitForSelector('#poll-conn-state[data-state="live"]');

    const { delivered } = await broadcast(server.url, token, 'maintenance at 18:00');
    assert.ok(delivered >= 4, `delivered to ${delivered}`);
    for (const page of [chat, polls, consolePage, visitor]) await waitForNotice(page, 'maintenance at 18:00');
    assert.match(await polls.textContent('#notices .notice-banner'), /Notice from alice/);
    await screenshot(polls, 'polls-broadcast');
    await screenshot(chat, 'chat-broadcast');

    // Dismissed, it goes, and focus does not get lost.
    await polls.click('#notices .notice-dismiss');
    await polls.waitForSelector('#notices .notice-banner', { state: 'detached' });
    assert.equal(await polls.evaluate(() => document.activeElement?.id), 'main');
    assert.equal(await chat.$$eval('#notices .notice-banner', (n) => n.length), 1, 'each page dismisses its own');
  }));

test('on a phone: the header keeps to one line logged in, and a broadcast stays in view while the page scrolls', { timeout: 90000 }, () =>
  withServe({ users: ['alexandra'], args: ['--polls-per-hour', '20'] }, async ({ server, open }) => {
    const token = await getToken(server.url, 'alexandra', PASSWORD);
    for (let i = 1; i <= 12; i++) await createPoll(server.url, token, `Question number ${i}?`, ['yes', 'no']);
    const phone = await open('phone', PHONE);
    await phone.goto(`${server.url}/polls`);
    await waitPollLive(phone);
    const headerHeight = async () => (await phone.locator('.site-header').boundingBox()).height;
    const asGuest = await headerHeight();
    await phone.click('#login-toggle');
    await phone.fill('#login-user', 'alexandra');
    await phone.fill('#login-password', PASSWORD);
    await phone.press('#login-password', 'Enter');
    await phone.waitForSelector('#me', { state: 'visible' });
    assert.equal(await phone.textContent('#me-name'), 'alexandra');
    // Logged in, the page connects again as alexandra; a broadcast reaches connections open
    // when it is sent, so it waits for that one.
    await phone.waitForFunction(() => window.__sockets.length === 2
      && document.getElementById('poll-conn-state').dataset.state === 'live');
    const loggedIn = await headerHeight();
    assert.ok(loggedIn <= asGuest + 1, `the header grew from ${asGuest} to ${loggedIn} px: it wrapped`);

    await broadcast(server.url, token, 'phones see this too');
    await waitForNotice(phone, 'phones see this too');
    await phone.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
    await phone.waitForFunction(() => window.scrollY > 300);
    const box = await phone.locator('#notices .notice-banner').boundingBox();
    assert.ok(box.y >= 0 && box.y + box.height <= 844, `the notice scrolled away: ${JSON.stringify(box)}`);
    await phone.screenshot({ path: artifact('polls-phone-scrolled-notice.png') });
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
