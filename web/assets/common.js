// Shared by every page: the HTTP API, who you are (login, logout, guest nickname), a WebSocket
// that reconnects with backoff, the connection-state badge and small DOM helpers.
//
// User data only ever reaches the page through textContent and attributes, never innerHTML.

/** User names and guest nicknames: 1–32 of A–Z a–z 0–9 _ - . (docs/api.md, "Names"). */
export const NICK_RE = /^[A-Za-z0-9_.-]{1,32}$/;
/** Room names: 1–64 of the same characters. */
export const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;

const NICK_KEY = 'tether.nick';

// ---------------------------------------------------------------------------------------------
// HTTP API

/** An error answer from the API: `status` is 0 when the server could not be reached. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

/**
 * Calls the JSON API on this origin. Resolves with the parsed body (null for 204) and rejects
 * with an ApiError carrying the server's `{"error": …}` text.
 */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const init = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin', signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    if (err?.name === 'AbortError') throw err;
    throw new ApiError(0, 'The server cannot be reached.');
  }
  const text = res.status === 204 ? '' : await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!res.ok) {
    const message = typeof data?.error === 'string' ? data.error : `${res.status} ${res.statusText}`.trim();
    throw new ApiError(res.status, message);
  }
  return data;
}

/** `ws(s)://{location.host}{path}?{params}`, leaving out params that are null or undefined. */
export function wsUrl(path, params = {}) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') query.set(key, String(value));
  }
  const qs = query.toString();
  return `${scheme}//${location.host}${path}${qs ? `?${qs}` : ''}`;
}

// ---------------------------------------------------------------------------------------------
// DOM helpers

/** `document.getElementById`, throwing when a page lacks an element its script needs. */
export function byId(id) {
  const found = document.getElementById(id);
  if (!found) throw new Error(`missing element #${id}`);
  return found;
}

/**
 * Builds an element. `attrs` keys: `class`, `text` (textContent), `dataset` (object), `hidden`,
 * event handlers as `onclick` etc.; everything else becomes an attribute. Children are nodes
 * or strings (inserted as text).
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key === 'hidden') node.hidden = Boolean(value);
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The hash as key=value pairs: `#room=lobby` → URLSearchParams { room: "lobby" }. */
export function hashParams() {
  return new URLSearchParams(location.hash.replace(/^#/, ''));
}

/** A `<time>` for an ISO timestamp: HH:MM today, otherwise with the date; full time as title. */
export function timeElement(ts) {
  const date = ts ? new Date(ts) : new Date();
  if (Number.isNaN(date.getTime())) return el('time', { text: String(ts ?? '') });
  const today = new Date();
  const sameDay = date.toDateString() === today.toDateString();
  const text = sameDay
    ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : date.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  return el('time', { datetime: date.toISOString(), title: date.toLocaleString(), text });
}

/** Whether a scrollable box is (nearly) scrolled to its end. */
export function isNearBottom(box, slack = 48) {
  return box.scrollHeight - box.scrollTop - box.clientHeight <= slack;
}

// ---------------------------------------------------------------------------------------------
// Guest nickname (kept in localStorage)

export function storedNick() {
  try {
    const nick = localStorage.getItem(NICK_KEY) ?? '';
    return NICK_RE.test(nick) ? nick : '';
  } catch {
    return '';
  }
}

export function storeNick(nick) {
  try { localStorage.setItem(NICK_KEY, nick); } catch { /* storage disabled: keep it for this page only */ }
}

/** Why a nickname is not acceptable, or '' when it is. */
export function nickProblem(nick) {
  if (!nick) return 'Choose a nickname.';
  if (nick.length > 32) return 'A nickname has at most 32 characters.';
  if (!NICK_RE.test(nick)) return 'A nickname uses only letters, digits, “_”, “-” and “.”.';
  return '';
}

// ---------------------------------------------------------------------------------------------
// Identity: GET /api/me, POST /api/login, POST /api/logout, and the header's login area

let identity = { user: null, guest: true, known: false };
const identityListeners = new Set();

/** The current identity: `{ user, guest, known }` (`user` is null for a guest). */
export function currentIdentity() {
  return identity;
}

/** Calls `fn(identity)` whenever the login state changes (not on the first load). */
export function onIdentityChange(fn) {
  identityListeners.add(fn);
  return () => identityListeners.delete(fn);
}

function setIdentity(next) {
  const changed = next.user !== identity.user || next.guest !== identity.guest;
  identity = next;
  renderAuth();
  if (changed) for (const fn of identityListeners) fn(identity);
}

/** Asks the server who we are; a 401 means guest. Resolves with the identity. */
export async function refreshIdentity() {
  try {
    const me = await api('/api/me');
    const guest = Boolean(me?.guest) || !me?.user;
    setIdentity({ user: guest ? null : me.user, guest, known: true });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) setIdentity({ user: null, guest: true, known: true });
    else setIdentity({ ...identity, known: false, problem: err.message });
  }
  return identity;
}

function renderAuth() {
  const me = document.getElementById('me');
  if (!me) return;
  const loggedIn = !identity.guest && identity.user;
  byId('me-name').textContent = loggedIn ? identity.user : '';
  me.hidden = !loggedIn;
  byId('logout').hidden = !loggedIn;
  const box = byId('login-box');
  box.hidden = Boolean(loggedIn);
  if (loggedIn) box.open = false;
  document.body.dataset.identity = loggedIn ? 'user' : 'guest';
}

/**
 * Wires the header's login form and logout button, then loads the identity. Every page calls
 * this first; it resolves with the identity once GET /api/me has answered.
 */
export async function initHeader() {
  const box = byId('login-box');
  const form = byId('login-form');
  const userInput = byId('login-user');
  const password = byId('login-password');
  const submit = byId('login-submit');
  const error = byId('login-error');

  box.addEventListener('toggle', () => {
    if (box.open) userInput.focus();
  });
  box.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && box.open) {
      box.open = false;
      byId('login-toggle').focus();
    }
  });
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    const user = userInput.value.trim();
    if (!user || !password.value) {
      error.textContent = 'Enter your user name and password.';
      return;
    }
    submit.disabled = true;
    try {
      await api('/api/login', { method: 'POST', body: { user, password: password.value } });
      password.value = '';
      await refreshIdentity();
      if (identity.guest) error.textContent = 'Logged in, but the server does not recognise the session.';
    } catch (err) {
      error.textContent = err.status === 401 ? 'Wrong user name or password.' : err.message;
      password.select();
    } finally {
      submit.disabled = false;
    }
  });
  byId('logout').addEventListener('click', async () => {
    try {
      await api('/api/logout', { method: 'POST', body: {} });
    } catch (err) {
      if (err.status !== 401) {
        announce(`Logout failed: ${err.message}`);
        return;
      }
    }
    await refreshIdentity();
    byId('login-toggle').focus();
  });
  return refreshIdentity();
}

/** Says something to screen readers through the page's polite live region (#announcer). */
export function announce(text) {
  const region = document.getElementById('announcer');
  if (!region) return;
  region.textContent = '';
  // A fresh text node after a tick makes repeated messages announce again.
  setTimeout(() => { region.textContent = text; }, 50);
}

// ---------------------------------------------------------------------------------------------
// Close codes in words

/** A sentence for a close code the server (or the network) ended a connection with. */
export function describeClose(code, reason = '') {
  const why = reason ? ` (“${reason}”)` : '';
  switch (code) {
    case 1000: return `The connection was closed normally${why}.`;
    case 1001: return `The server is shutting down or restarting${why}.`;
    case 1002: return `The connection was closed after a protocol error${why}.`;
    case 1003: return `The server cannot accept that kind of data${why}.`;
    case 1005: return 'The connection was closed without a status code.';
    case 1006: return 'The connection was lost (no close frame was received).';
    case 1007: return `The server rejected text that was not valid UTF-8${why}.`;
    case 1008: return `You were sending messages too fast, so the server disconnected you${why}.`;
    case 1009: return `A message was too big for the server${why}.`;
    case 1011: return `The server hit an internal error${why}.`;
    case 1012: return `The server is restarting${why}.`;
    case 1013: return `Your connection could not keep up with the traffic, so the server dropped it${why}.`;
    case 1015: return 'The TLS handshake failed.';
    default: return `The connection was closed with code ${code}${why}.`;
  }
}

// ---------------------------------------------------------------------------------------------
// A WebSocket that comes back

/**
 * A JSON WebSocket that reconnects after a loss with exponential backoff and jitter
 * (0.5 s doubling to 10 s by default), waits for the network while the browser is offline,
 * and reports its state: idle → connecting → live → reconnecting → connecting … or offline.
 *
 * The owner decides when the connection counts as live (`markLive()`, e.g. once the server's
 * history is complete); the backoff starts over only then, so a server that accepts and at once
 * closes is not hammered.
 *
 * options: `url()` (called for every attempt), `onMessage(obj)`, `onOpen()`,
 * `onClose({ code, reason, opened, wasLive })`, `onState(state, info)`.
 */
export class LiveSocket {
  constructor({ url, onMessage, onOpen, onClose, onState, baseDelay = 500, maxDelay = 10000 }) {
    this.url = url;
    this.handlers = { onMessage, onOpen, onClose, onState };
    this.baseDelay = baseDelay;
    this.maxDelay = maxDelay;
    this.ws = null;
    this.state = 'idle';
    this.running = false;
    this.attempt = 0;
    this.failuresBeforeOpen = 0;
    this.timer = null;
    this.onOffline = () => this.#wentOffline();
    this.onOnline = () => this.#cameOnline();
    window.addEventListener('offline', this.onOffline);
    window.addEventListener('online', this.onOnline);
  }

  /** Connects (or reconnects at once) and keeps reconnecting until `stop()`. */
  start() {
    this.running = true;
    this.attempt = 0;
    this.failuresBeforeOpen = 0;
    this.#drop();
    this.#connect();
  }

  /** Closes the connection (code 1000) and stops reconnecting; `info` goes to the state. */
  stop(info = {}) {
    this.running = false;
    this.#drop();
    this.#setState('offline', { stopped: true, ...info });
  }

  /** Reconnects now instead of waiting for the backoff timer. */
  reconnectNow() {
    if (!this.running) return;
    this.attempt = 0;
    this.#drop();
    this.#connect();
  }

  /** The connection is ready for use: reset the backoff and report `live`. */
  markLive() {
    this.attempt = 0;
    this.failuresBeforeOpen = 0;
    this.#setState('live');
  }

  /** Sends `obj` as JSON; false when the connection is not live. */
  send(obj) {
    if (this.state !== 'live' || this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  #setState(state, info = {}) {
    this.state = state;
    this.handlers.onState?.(state, info);
  }

  /** Forgets the current socket (without reporting its close) and any pending retry. */
  #drop() {
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try { ws.close(1000, 'bye'); } catch { /* already closing */ }
    }
  }

  #connect() {
    clearTimeout(this.timer);
    this.timer = null;
    if (navigator.onLine === false) {
      this.#setState('offline', { network: true });
      return;
    }
    this.#setState('connecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch (err) {
      this.#lost({ code: 1006, reason: err.message, opened: false });
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      this.handlers.onOpen?.();
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws || typeof event.data !== 'string') return;
      let data;
      try { data = JSON.parse(event.data); } catch { return; }
      this.handlers.onMessage?.(data);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.#lost({ code: event.code, reason: event.reason, opened });
    };
  }

  #lost({ code, reason, opened }) {
    const wasLive = this.state === 'live';
    this.failuresBeforeOpen = opened ? 0 : this.failuresBeforeOpen + 1;
    this.handlers.onClose?.({ code, reason, opened, wasLive, failuresBeforeOpen: this.failuresBeforeOpen });
    if (!this.running || this.ws) return; // stopped, or restarted by a handler
    if (navigator.onLine === false) {
      this.#setState('offline', { network: true });
      return;
    }
    const ceiling = Math.min(this.maxDelay, this.baseDelay * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.attempt = Math.min(this.attempt + 1, 16);
    this.timer = setTimeout(() => this.#connect(), delay);
    this.#setState('reconnecting', { retryAt: Date.now() + delay, code, failuresBeforeOpen: this.failuresBeforeOpen });
  }

  #wentOffline() {
    if (!this.running) return;
    this.#drop();
    this.#setState('offline', { network: true });
  }

  #cameOnline() {
    if (!this.running || this.state !== 'offline') return;
    this.attempt = 0;
    this.#connect();
  }
}

/**
 * The connection badge: `<p class="conn" data-state=…>` with a dot, the state in words (read by
 * screen readers through role="status") and a countdown that is only visual.
 */
export class ConnStatus {
  constructor(node, { labels = {} } = {}) {
    this.node = node;
    this.text = node.querySelector('.conn-text');
    this.detail = node.querySelector('.conn-detail');
    this.labels = { connecting: 'Connecting…', live: 'Live', reconnecting: 'Reconnecting', offline: 'Offline', ...labels };
    this.ticker = null;
  }

  set(state, info = {}) {
    clearInterval(this.ticker);
    this.ticker = null;
    this.node.dataset.state = state;
    this.node.dataset.stopped = String(Boolean(info.stopped));
    let label = this.labels[state] ?? state;
    if (state === 'offline' && info.network) label = 'Offline — waiting for the network';
    else if (state === 'offline' && info.label) label = info.label;
    this.text.textContent = label;
    this.detail.textContent = '';
    if (state === 'reconnecting' && info.retryAt) {
      const tick = () => {
        const seconds = Math.max(0, Math.ceil((info.retryAt - Date.now()) / 1000));
        this.detail.textContent = ` in ${seconds} s`;
      };
      tick();
      this.ticker = setInterval(tick, 250);
    }
  }
}
