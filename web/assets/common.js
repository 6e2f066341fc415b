// Shared by every page: the HTTP API, who you are (login, logout, guest nickname), the page's
// one connection to /ws (tether-client: channels, reconnects, resumes), the connection-state
// badge, broadcast notices and small DOM helpers.
//
// User data only ever reaches the page through textContent and attributes, never innerHTML.
import { Client } from '/assets/tether-client.js';

/** User names and guest nicknames: 1–32 of A–Z a–z 0–9 _ - . (docs/api.md, "Names"). */
export const NICK_RE = /^[A-Za-z0-9_.-]{1,32}$/;
/** Room names: 1–64 of the same characters. */
export const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;

const NICK_KEY = 'tether.nick';

// ---------------------------------------------------------------------------------------------
// HTTP API

/** An error answer from the API: `status` is 0 when the server could not be reached. */
export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    /** The parsed error body: some answers say more than `error` (GET /api/me: `guests`). */
    this.body = body;
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
    throw new ApiError(res.status, message, data);
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

// `guests`: whether the server lets guests chat and vote (GET /api/me says; assumed until then).
let identity = { user: null, guest: true, guests: true, known: false };
const identityListeners = new Set();

/** The current identity: `{ user, guest, guests, known }` (`user` is null for a guest). */
export function currentIdentity() {
  return identity;
}

/** Calls `fn(identity)` whenever the login state changes (not on the first load). */
export function onIdentityChange(fn) {
  identityListeners.add(fn);
  return () => identityListeners.delete(fn);
}

function setIdentity(next) {
  const changed = next.user !== identity.user || next.guest !== identity.guest || next.guests !== identity.guests;
  identity = next;
  renderAuth();
  if (changed) for (const fn of identityListeners) fn(identity);
}

/** Asks the server who we are (`user: null` for a guest; a 401, from an older server, too). Resolves with the identity. */
export async function refreshIdentity() {
  try {
    const me = await api('/api/me');
    const guest = Boolean(me?.guest) || !me?.user;
    setIdentity({ user: guest ? null : me.user, guest, guests: me?.guests !== false, known: true });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      setIdentity({ user: null, guest: true, guests: err.body?.guests !== false, known: true });
    } else {
      setIdentity({ ...identity, known: false, problem: err.message });
    }
  }
  return identity;
}

function renderAuth() {
  const me = document.getElementById('me');
  if (!me) return;
  const loggedIn = !identity.guest && identity.user;
  byId('me-name').textContent = loggedIn ? identity.user : '';
  // On a phone the name shrinks to its initial (the whole name in the tooltip and for readers).
  const initial = document.getElementById('me-initial');
  if (initial) initial.textContent = loggedIn ? [...identity.user][0].toUpperCase() : '';
  me.title = loggedIn ? `Signed in as ${identity.user}` : '';
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

/**
 * The connection badge: `<p class="conn" data-state=…>` with a dot and the state in words (read
 * by screen readers through role="status"). States: connecting, live, watching (connected without a
 * name: broadcasts only), reconnecting, offline
 * (`stopped` when nothing will reconnect by itself, `network` while the browser is offline).
 */
export class ConnStatus {
  constructor(node, { labels = {} } = {}) {
    this.node = node;
    this.text = node.querySelector('.conn-text');
    this.detail = node.querySelector('.conn-detail');
    this.labels = {
      connecting: 'Connecting…', live: 'Live', watching: 'Reading only', reconnecting: 'Reconnecting…', offline: 'Offline', ...labels,
    };
  }

  set(state, info = {}) {
    this.node.dataset.state = state;
    this.node.dataset.stopped = String(Boolean(info.stopped));
    let label = this.labels[state] ?? state;
    if (state === 'offline' && info.network) label = 'Offline — waiting for the network';
    else if (state === 'offline' && info.label) label = info.label;
    // Unchanged words are not written again: role="status" would say them again.
    if (this.text.textContent !== label) this.text.textContent = label;
    if (this.detail) this.detail.textContent = '';
  }
}

// ---------------------------------------------------------------------------------------------
// The page's connection: one tether-client Client on /ws for every channel the page follows

/** The /ws address of this server. */
export function channelsUrl() {
  return wsUrl('/ws');
}

/**
 * The guest nickname to connect with, '' for a logged-in user (the session cookie goes along),
 * or null when this visitor has no name to chat or vote with yet (no nickname, or guests are
 * off). Such a visitor may still connect without one ('') to watch: broadcasts, the polls.
 */
export function connectName(identity, nick) {
  if (!identity.guest) return '';
  if (!identity.guests || !NICK_RE.test(nick ?? '')) return null;
  return nick;
}

/** A sentence for a refusal that stopped the client for good (a close code 4500–4999, 1008…). */
export function describeRefusal(code, reason = '', nick = '') {
  switch (code) {
    case 4501: return 'The server did not accept your login (your session may have ended): log in again.';
    case 4503: return nick
      ? `The nickname “${nick}” is taken, belongs to a registered user or is not allowed: pick another, or log in.`
      : 'That name is taken or not allowed: pick another, or log in.';
    case 4504: return 'This server does not let guests in: log in to take part.';
    case 4502:
    case 1008: return 'Your login has ended (logged out, revoked or expired): log in again.';
    case 4500: return `The server and this page disagree on the protocol${reason ? ` (“${reason}”)` : ''}: reload the page.`;
    default: return describeClose(code, reason);
  }
}

/**
 * Owns the page's Client: starts it for an identity (a new Client when the identity changes,
 * since a guest's name goes with the upgrade), reports its state to a ConnStatus, shows
 * broadcasts as notices, and tells the page about a refusal once.
 *
 * options: `status` (a ConnStatus or null), `onClient(client)` (subscribe the page's channels
 * to a new client), `onState(state, info)`, `onRefused(error, client)` (stopped for good).
 */
export class Connection {
  constructor({ status = null, onClient, onState, onRefused } = {}) {
    this.status = status;
    this.handlers = { onClient, onState, onRefused };
    this.client = null;
    this.state = 'offline';
    this.info = { stopped: true };
    window.addEventListener('offline', () => this.#report());
    window.addEventListener('online', () => {
      // The client's backoff may have grown while the network was away: try now (a client
      // stopped by a refusal stays stopped: the network was not why).
      this.client?.reconnect();
      this.#report();
    });
  }

  /**
   * Connects as `name` (a guest's nickname; '' for a logged-in user or a visitor without an
   * identity), replacing any client. `watch`: this visitor only watches, and the badge says
   * "watching" rather than "live" once connected.
   */
  start(name, { watch = false } = {}) {
    this.#drop();
    this.watch = watch;
    const client = new Client(channelsUrl(), name ? { name } : {});
    this.client = client;
    this.wasLive = false; // connected at least once: a later attempt is a reconnect
    this.attempt = 0;
    const mine = (fn) => (value) => { if (this.client === client) fn(value); };
    client.on('connecting', mine(({ attempt }) => {
      this.attempt = attempt;
      this.#report();
    }));
    client.on('connected', mine(() => {
      this.wasLive = true;
      this.#report();
    }));
    // The client's state has moved on when its events come: the badge reads it.
    client.on('disconnected', mine(({ reconnect }) => {
      if (reconnect) this.#report(); // else 'closed' follows
    }));
    // A refusal that stops the client comes as 'error' just before 'closed': the badge says
    // "disconnected" first, then the page says why (once), over it.
    let refusal = null;
    client.on('error', mine((error) => {
      if (client.state === 'closed' && error.code >= 1000) refusal = error;
    }));
    client.on('closed', mine(({ code, reason }) => {
      this.#report({ code, reason });
      if (refusal) this.handlers.onRefused?.(refusal, client);
      refusal = null;
    }));
    client.on('broadcast', mine(showBroadcast));
    this.handlers.onClient?.(client);
    client.connect();
    return client;
  }

  /** Closes the client for good; the badge says `label`. */
  stop(label = 'Not connected') {
    this.#drop();
    this.#set('offline', { stopped: true, label });
  }

  /**
   * Reconnects at once instead of waiting out the backoff (the client keeps its subscriptions
   * and pending publishes), or connects again after a stop by a refusal.
   */
  reconnectNow() {
    const client = this.client;
    if (!client) return;
    if (client.state === 'closed') client.connect();
    else client.reconnect();
  }

  /** Words for the badge while stopped (why a refusal stopped it), kept until the next state. */
  label(label) {
    if (this.state === 'offline') this.#set('offline', { ...this.info, label });
  }

  /** Whether the client is connected: subscriptions and publishes go through now. */
  get live() {
    return this.client?.state === 'connected';
  }

  #drop() {
    const client = this.client;
    this.client = null;
    if (client && client.state !== 'closed') client.close();
  }

  #report(closed) {
    const client = this.client;
    if (!client) return;
    if (client.state === 'closed') {
      this.#set('offline', { stopped: true, code: closed?.code, label: 'Disconnected' });
    } else if (navigator.onLine === false) {
      // The browser knows before the socket does: say so, and let the client retry meanwhile.
      this.#set('offline', { network: true });
    } else if (client.state === 'connected') {
      this.#set(this.watch ? 'watching' : 'live');
    } else if (client.state === 'connecting' && this.attempt === 0 && !this.wasLive) {
      this.#set('connecting');
    } else {
      this.#set('reconnecting');
    }
  }

  #set(state, info = {}) {
    this.state = state;
    this.info = info;
    this.status?.set(state, info);
    this.handlers.onState?.(state, info);
  }
}

// ---------------------------------------------------------------------------------------------
// Broadcast notices (POST /api/broadcast reaches every /ws connection)

const MAX_NOTICES = 3;

/** Shows a broadcast publication at the top of the page until dismissed. */
export function showBroadcast(pub) {
  const text = typeof pub?.data?.text === 'string' ? pub.data.text : '';
  if (!text) return;
  showNotice(text, { from: pub.user, ts: pub.ts });
}

/**
 * A notice in #notices: role="status", dismissable, told to screen readers once through the
 * announcer (a live region inserted with its content is not reliably read). The newest is on top.
 */
export function showNotice(text, { from, ts, kind = 'broadcast' } = {}) {
  const box = document.getElementById('notices');
  if (!box) return;
  const label = from ? `Notice from ${from}` : 'Notice';
  const dismiss = el('button', {
    type: 'button',
    class: 'btn btn-quiet btn-small notice-dismiss',
    'aria-label': `Dismiss: ${text.length > 60 ? `${text.slice(0, 60)}…` : text}`,
    text: 'Dismiss',
  });
  const item = el('div', { class: 'notice-banner', role: 'status', dataset: { kind } },
    el('p', { class: 'notice-body' },
      el('span', { class: 'notice-label', text: label }), ' ', timeElement(ts), el('br'),
      el('span', { class: 'notice-text', text })),
    dismiss);
  dismiss.addEventListener('click', () => {
    const next = item.nextElementSibling ?? item.previousElementSibling;
    const hadFocus = item.contains(document.activeElement);
    item.remove();
    // Focus stays in reach: the next notice's button, else the page's main region.
    if (hadFocus) (next?.querySelector('.notice-dismiss') ?? document.getElementById('main'))?.focus();
  });
  box.prepend(item);
  while (box.childElementCount > MAX_NOTICES) box.lastElementChild.remove();
  announce(`${label}: ${text}`);
}
