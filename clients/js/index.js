// The JavaScript client of tether's channel protocol, tether.v1 (docs/protocol.md): one
// WebSocket, many channels, each resumed from its own offset after a reconnect.
// An ES module without dependencies; it runs wherever a WebSocket constructor does.

/** The subprotocol the client speaks. */
export const PROTOCOL = 'tether.v1';

/** A refusal or failure, with the protocol's code (docs/protocol.md, "Errors" and "Disconnect codes"). */
export class TetherError extends Error {
  constructor(code, message, temporary = false) {
    super(message);
    this.name = 'TetherError';
    /** The error code (100–199) or close code. */
    this.code = code;
    /** Whether trying again later can succeed. */
    this.temporary = temporary;
  }
}

/** Error codes a later attempt can get past. */
const TEMPORARY_ERRORS = new Set([100, 110]);

/**
 * Whether reconnecting can help after the server closed with `code` (when it sent no
 * `disconnect` push saying so): transient codes 1001, 1005, 1006, 1011–1014 and 4000–4499 yes;
 * 4502 (credential revoked or expired) only with a fresh token; everything else is permanent.
 */
export function canReconnect(code, hasTokenSource = false) {
  if (code === 4502) return hasTokenSource;
  if (code >= 4000 && code <= 4499) return true;
  return code === 1001 || code === 1005 || code === 1006 || (code >= 1011 && code <= 1014);
}

/** A connection that lasted this long counts as a success: the backoff starts over. */
const STABLE_MS = 10_000;

function randomKey() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * A connection to a tether server's `/ws`. Subscriptions and unacknowledged publishes outlive
 * the WebSocket: after a transient disconnect the client reconnects with backoff and full
 * jitter, resubscribes every channel from its last offset, then resends what was not
 * acknowledged (with the same idempotency key, so nothing is stored twice).
 */
export class Client {
  /**
   * @param {string} url  ws:// or wss:// URL of the endpoint, e.g. `wss://example.com/ws`.
   * @param {object} [options]  see index.d.ts.
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = { minDelay: 500, maxDelay: 20_000, timeout: 10_000, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError('no WebSocket here: pass options.WebSocket');
    }
    /** 'idle' | 'connecting' | 'connected' | 'disconnected' (reconnecting) | 'closed' */
    this.state = 'idle';
    /** What the server said on connect: { client, user, guest, limits }. */
    this.session = null;
    this.subs = new Map();
    this.pending = new Map();
    this.publishes = [];
    this.listeners = new Map();
    this.nextId = 1;
    this.attempt = 0;
    this.ws = null;
    this.timer = null;
    this.openedAt = 0;
    this.lastDisconnect = null;
  }

  /** Listens for 'connecting', 'connected', 'disconnected', 'closed', 'error' or 'broadcast'. */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return this;
  }

  /** Stops listening. */
  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
    return this;
  }

  emit(event, value) {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        listener(value);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }

  /** Opens the connection (again, after `close`). */
  connect() {
    if (this.state === 'idle' || this.state === 'closed') {
      this.stopped = false;
      this.attempt = 0;
      this.open();
    }
    return this;
  }

  /** Closes for good: pending commands and publishes fail, nothing reconnects. */
  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.close(1000);
    }
    this.fail(new TetherError(1000, 'the client closed'), true);
    this.state = 'closed';
    this.emit('closed', { code: 1000, reason: 'closed by the client' });
  }

  async open() {
    this.state = 'connecting';
    this.emit('connecting', { attempt: this.attempt });
    let url;
    try {
      url = new URL(this.url);
      const token = this.options.getToken ? await this.options.getToken() : this.options.token;
      if (token) url.searchParams.set('token', token);
      if (this.options.name) url.searchParams.set('name', this.options.name);
    } catch (e) {
      this.emit('error', e);
      this.retry();
      return;
    }
    if (this.stopped) return;
    const ws = new this.WebSocket(url.toString(), [PROTOCOL]);
    this.ws = ws;
    this.lastDisconnect = null;
    // A handshake that neither completes nor fails (a black-holed network, a server that
    // stopped accepting) is given up after `timeout`, like a command.
    const handshake = setTimeout(() => {
      if (ws !== this.ws || ws.readyState !== 0) return;
      ws.onclose = null;
      ws.close();
      this.closed(ws, 1006, `no handshake within ${this.options.timeout} ms`);
    }, this.options.timeout);
    ws.onopen = () => {
      clearTimeout(handshake);
      this.opened(ws);
    };
    ws.onmessage = (e) => this.receive(e.data);
    ws.onclose = (e) => {
      clearTimeout(handshake);
      this.closed(ws, e.code, e.reason);
    };
    ws.onerror = () => {};
  }

  async opened(ws) {
    this.openedAt = Date.now();
    let session;
    try {
      session = await this.call({ op: 'connect' });
    } catch (e) {
      if (ws === this.ws) ws.close(4000);
      return;
    }
    if (ws !== this.ws) return;
    this.session = session;
    this.state = 'connected';
    this.emit('connected', session);
    await Promise.all([...this.subs.values()].map((sub) => sub.subscribe()));
    for (const publish of this.publishes) {
      if (!publish.sent) this.sendPublish(publish);
    }
  }

  closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    const said = this.lastDisconnect;
    const reconnect = !this.stopped && (said
      ? said.reconnect || (code === 4502 && !!this.options.getToken)
      : canReconnect(code, !!this.options.getToken));
    const why = said?.reason || reason || `closed with ${code}`;
    this.fail(new TetherError(code, why, reconnect), !reconnect);
    for (const sub of this.subs.values()) sub.state = 'unsubscribed';
    this.emit('disconnected', { code, reason: why, reconnect });
    if (!reconnect) {
      this.state = 'closed';
      this.emit('error', new TetherError(code, why, false));
      this.emit('closed', { code, reason: why });
      return;
    }
    if (Date.now() - this.openedAt >= STABLE_MS) this.attempt = 0;
    this.retry();
  }

  /** Waits a random delay up to the backoff (full jitter), then opens again. */
  retry() {
    if (this.stopped) return;
    this.state = 'disconnected';
    const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this.attempt);
    this.attempt += 1;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), Math.random() * ceiling);
  }

  /** Fails the commands waiting for replies; publishes too when `all` (nothing will resend them). */
  fail(error, all) {
    for (const { reject, timer } of this.pending.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this.pending.clear();
    for (const publish of this.publishes) publish.sent = false;
    if (all) {
      for (const publish of this.publishes) publish.reject(error);
      this.publishes = [];
    }
  }

  receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message.id !== undefined) {
      const waiting = this.pending.get(message.id);
      if (!waiting) return;
      this.pending.delete(message.id);
      clearTimeout(waiting.timer);
      if (message.error) {
        const { code, message: text } = message.error;
        waiting.reject(new TetherError(code, text, TEMPORARY_ERRORS.has(code)));
      } else {
        waiting.resolve(message);
      }
      return;
    }
    switch (message.type) {
      case 'disconnect':
        this.lastDisconnect = message;
        return;
      case 'pub':
        if (message.channel === 'broadcast') {
          this.emit('broadcast', message);
          return;
        }
        this.subs.get(message.channel)?.publication(message);
        return;
      case 'join':
      case 'leave':
      case 'event':
        this.subs.get(message.channel)?.push(message);
        return;
      default:
    }
  }

  /** Sends one command and resolves with its reply (rejects with a TetherError). */
  call(command) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) {
      return Promise.reject(new TetherError(0, 'not connected', true));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TetherError(0, `no reply to ${command.op} within ${this.options.timeout} ms`, true));
      }, this.options.timeout);
      this.pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ ...command, id }));
    });
  }

  /**
   * Subscribes to `channel` with handlers (see index.d.ts); the subscription is restored after
   * every reconnect from its last offset.
   */
  subscribe(channel, handlers = {}) {
    if (this.subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, handlers);
    this.subs.set(channel, sub);
    if (this.state === 'connected') sub.subscribe();
    return sub;
  }

  /** The subscription to `channel`, if any. */
  subscription(channel) {
    return this.subs.get(channel);
  }

  publish(channel, data) {
    const limit = this.session?.limits?.message_size;
    const key = randomKey();
    const size = new TextEncoder().encode(JSON.stringify({ id: 0, op: 'publish', channel, data, key })).length;
    if (limit && size > limit) {
      return Promise.reject(new TetherError(111, `message too large: ${size} bytes, the limit is ${limit}`));
    }
    return new Promise((resolve, reject) => {
      const publish = { channel, data, key, resolve, reject, sent: false };
      this.publishes.push(publish);
      if (this.state === 'connected') this.sendPublish(publish);
    });
  }

  async sendPublish(publish) {
    publish.sent = true;
    try {
      const reply = await this.call({ op: 'publish', channel: publish.channel, data: publish.data, key: publish.key });
      this.settle(publish);
      publish.resolve({ offset: reply.offset });
    } catch (e) {
      if (e.code === 0 && e.temporary) return; // disconnected: resent after the reconnect
      this.settle(publish);
      publish.reject(e);
    }
  }

  settle(publish) {
    this.publishes = this.publishes.filter((p) => p !== publish);
  }
}

/** A channel this client follows. */
export class Subscription {
  constructor(client, channel, handlers) {
    this.client = client;
    this.channel = channel;
    this.handlers = handlers;
    /** The offset of the last publication received, and the stream's epoch. */
    this.offset = null;
    this.epoch = null;
    /** 'unsubscribed' | 'subscribing' | 'subscribed' | 'failed' | 'removed' */
    this.state = 'unsubscribed';
    this.attempt = 0;
  }

  async subscribe() {
    if (this.state === 'removed' || this.state === 'failed') return;
    const command = { op: 'subscribe', channel: this.channel };
    if (this.offset !== null && this.epoch) {
      command.since = this.offset;
      command.epoch = this.epoch;
    }
    this.state = 'subscribing';
    let reply;
    try {
      reply = await this.client.call(command);
    } catch (e) {
      if (e.code === 0) return; // disconnected: subscribed again after the reconnect
      if (e.temporary) {
        const delay = Math.random() * Math.min(20_000, 500 * 2 ** this.attempt++);
        setTimeout(() => { if (this.client.state === 'connected') this.subscribe(); }, delay);
        return;
      }
      this.state = 'failed';
      this.client.subs.delete(this.channel);
      this.call('onError', e);
      return;
    }
    this.attempt = 0;
    this.state = 'subscribed';
    this.epoch = reply.epoch;
    // The replayed publications follow the reply and move the offset as they come; with none,
    // the reply's offset is where the stream stands.
    if (reply.replayed === 0) this.offset = reply.offset;
    this.call('onSubscribed', reply);
  }

  publication(message) {
    // The offset is kept before the handler runs: a handler that throws loses nothing on resume.
    if (typeof message.offset === 'number') this.offset = message.offset;
    this.call('onPublication', message);
  }

  push(message) {
    const handler = { join: 'onJoin', leave: 'onLeave', event: 'onEvent' }[message.type];
    this.call(handler, message);
  }

  call(name, value) {
    const handler = this.handlers[name];
    if (!handler) return;
    try {
      handler(value);
    } catch (e) {
      queueMicrotask(() => { throw e; });
    }
  }

  /** Publishes `data`; resolves with `{ offset }` once stored (retried across reconnects). */
  publish(data) {
    return this.client.publish(this.channel, data);
  }

  /** Sends an ephemeral event (e.g. typing) to the channel's other subscribers. */
  async event(name, data) {
    await this.client.call({ op: 'event', channel: this.channel, name, data });
  }

  /** Who is subscribed now: `[{ user, clients }]`. */
  async presence() {
    return (await this.client.call({ op: 'presence', channel: this.channel })).members;
  }

  /** Stored publications: `{ epoch, offset, publications }`. */
  async history({ since, limit } = {}) {
    return this.client.call({ op: 'history', channel: this.channel, since, limit });
  }

  /** Stops following the channel. */
  async unsubscribe() {
    const wasSubscribed = this.state === 'subscribed';
    this.state = 'removed';
    this.client.subs.delete(this.channel);
    if (wasSubscribed && this.client.state === 'connected') {
      await this.client.call({ op: 'unsubscribe', channel: this.channel });
    }
  }
}
