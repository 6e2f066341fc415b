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

/** How often a publish refused for the rate (110) is tried again before it is reported. */
const MAX_RATE_RETRIES = 8;
/** The pause before such a retry, times the refusals so far. */
const RATE_RETRY_MS = 250;

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
    /** Channel → the end of a subscription still leaving it (its unsubscribe goes out first). */
    this.leaving = new Map();
    this.pending = new Map();
    this.publishes = [];
    this.listeners = new Map();
    this.nextId = 1;
    this.opening = 0;
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

  /**
   * Reconnects now instead of waiting out the backoff: while `disconnected` (waiting to try
   * again) the timer is cut short and the backoff starts over; subscriptions and pending
   * publishes carry on as after any reconnect. Does nothing while `connecting` or `connected`
   * (the connection is fine or on its way), nor when `idle` or `closed` (use `connect()`).
   */
  reconnect() {
    if (this.state === 'disconnected' && !this.stopped) {
      clearTimeout(this.timer);
      this.timer = null;
      this.attempt = 0;
      this.open();
    }
    return this;
  }

  /** Closes for good: pending commands and publishes fail, nothing reconnects. */
  close() {
    if (this.state === 'closed') return;
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000);
    }
    for (const sub of this.subs.values()) sub.state = 'unsubscribed';
    this.state = 'closed';
    this.fail(new TetherError(1000, 'the client closed'), true);
    this.emit('closed', { code: 1000, reason: 'closed by the client' });
  }

  async open() {
    const opening = ++this.opening;
    // Set once this attempt's socket opens: an attempt that never does is a failure, whatever
    // an earlier connection lasted.
    this.openedAt = null;
    this.state = 'connecting';
    this.emit('connecting', { attempt: this.attempt });
    let url;
    try {
      url = new URL(this.url);
      // The token goes in the first command, not the URL, which servers and proxies log.
      this.token = this.options.getToken ? await this.options.getToken() : this.options.token;
      if (this.options.name) url.searchParams.set('name', this.options.name);
    } catch (e) {
      if (this.stopped || opening !== this.opening) return;
      // No connection was made (the URL is bad, getToken() failed): told like a lost one.
      this.retry();
      this.emit('error', e);
      this.emit('disconnected', { code: 0, reason: String(e?.message ?? e), reconnect: true });
      return;
    }
    if (this.stopped || opening !== this.opening) return;
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
    ws.onmessage = (e) => { if (ws === this.ws) this.receive(e.data); };
    ws.onclose = (e) => {
      clearTimeout(handshake);
      this.closed(ws, e.code, e.reason);
    };
    ws.onerror = () => {
      // An error before the socket opened is a failed handshake. Browsers and Node 22 follow it
      // with `close`; Node 20's WebSocket does not (it stays CONNECTING), so it is taken as
      // the attempt's end here, once.
      if (ws !== this.ws || ws.readyState === 1 || this.openedAt !== null) return;
      clearTimeout(handshake);
      ws.onclose = null;
      ws.onopen = null;
      ws.onerror = null;
      try {
        ws.close();
      } catch {
        // Closing a socket that never opened may throw; it is abandoned either way.
      }
      this.closed(ws, 1006, 'the WebSocket handshake failed');
    };
  }

  async opened(ws) {
    this.openedAt = Date.now();
    let session;
    try {
      const connect = { op: 'connect' };
      if (this.token) connect.token = this.token;
      if (this.options.info) connect.info = this.options.info;
      session = await this.call(connect);
    } catch (e) {
      if (ws === this.ws) ws.close(4000);
      return;
    }
    if (ws !== this.ws || this.stopped) return;
    this.session = session;
    // A new connection starts with the server's whole burst, less the connect command.
    this.tokens = undefined;
    this.refilled = undefined;
    if (this.refill()) this.tokens -= 1;
    this.state = 'connected';
    // The channels' subscribes go out first, then listeners may publish or subscribe more.
    const resubscribed = Promise.all([...this.subs.values()].map((sub) => sub.subscribe()));
    this.emit('connected', session);
    // Publishing needs the subscription: what waits is sent once the channels are back.
    await resubscribed;
    if (ws !== this.ws) return;
    for (const publish of this.publishes) {
      if (!publish.sent && this.ready(publish.channel)) this.sendPublish(publish);
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
    for (const sub of this.subs.values()) sub.state = 'unsubscribed';
    // The state moves on first: listeners of every event read the state it led to.
    if (reconnect) {
      // Only a connection that opened and lasted starts the backoff over: a failed handshake
      // (a 503, a reset) counts as one more failure.
      if (this.openedAt !== null && Date.now() - this.openedAt >= STABLE_MS) this.attempt = 0;
      this.retry();
    } else {
      this.stopped = true;
      this.state = 'closed';
    }
    this.fail(new TetherError(code, why, reconnect), !reconnect);
    this.emit('disconnected', { code, reason: why, reconnect });
    if (!reconnect) {
      this.emit('error', new TetherError(code, why, false));
      this.emit('closed', { code, reason: why });
    }
  }

  /** Sets the state to `disconnected`, then opens again after a random delay up to the backoff (full jitter). */
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
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const { done, timer } of pending) {
      clearTimeout(timer);
      done(error);
    }
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
        waiting.done(new TetherError(code, text, TEMPORARY_ERRORS.has(code)));
      } else {
        const { id, ...result } = message; // the id is the protocol's business, not the caller's
        waiting.done(null, result);
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
        this.subscribed(message.channel)?.publication(message);
        return;
      case 'join':
      case 'leave':
      case 'event':
        this.subscribed(message.channel)?.push(message);
        return;
      case 'unsub':
        this.subscribed(message.channel)?.ended(message);
        return;
      default:
    }
  }

  /**
   * The subscription that pushes of `channel` are for: one the server has confirmed. Pushes
   * for a subscription that was let go (still arriving until its unsubscribe is answered) are
   * dropped, as are any before a new subscription's reply.
   */
  subscribed(channel) {
    const sub = this.subs.get(channel);
    return sub?.state === 'subscribed' ? sub : undefined;
  }

  /** Sends one command and resolves with its reply (rejects with a TetherError). */
  call(command) {
    return new Promise((resolve, reject) => {
      this.send(command, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }

  /**
   * Sends one command; `done(error, reply)` runs as soon as the reply is read, before the
   * messages after it (a subscription's replayed publications), or on a failure: not
   * connected or disconnected (code 0 or the close code), no reply within `timeout`.
   */
  send(command, done) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) {
      queueMicrotask(() => done(new TetherError(0, 'not connected', true)));
      return;
    }
    if (this.refill()) this.tokens -= 1;
    const id = this.nextId++;
    const timer = setTimeout(() => {
      this.pending.delete(id);
      done(new TetherError(0, `no reply to ${command.op} within ${this.options.timeout} ms`, true));
    }, this.options.timeout);
    this.pending.set(id, { done, timer });
    ws.send(JSON.stringify({ ...command, id }));
  }

  /**
   * Subscribes to `channel` with handlers (see index.d.ts); the subscription is restored after
   * every reconnect from its last offset. A subscription to the same channel that is still
   * leaving (its unsubscribe() not done) is let go first: this one's subscribe follows it.
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
      const publish = { channel, data, key, resolve, reject, sent: false, refused: 0 };
      this.publishes.push(publish);
      if (this.state === 'connected' && this.ready(channel)) this.sendPublish(publish);
    });
  }

  /**
   * Whether a publish to `channel` can go now: the subscription it needs is confirmed or its
   * subscribe was sent before (the server answers in order). One still waiting (for the
   * previous subscription to the channel to leave, or to retry) sends them once confirmed.
   */
  ready(channel) {
    const sub = this.subs.get(channel);
    return !sub || sub.state === 'subscribed' || Boolean(sub.request);
  }

  async sendPublish(publish) {
    publish.sent = true;
    const ws = this.ws;
    await this.pace();
    // Disconnected while waiting its turn: it goes again after the reconnect.
    if (ws !== this.ws) return;
    try {
      const reply = await this.call({ op: 'publish', channel: publish.channel, data: publish.data, key: publish.key });
      this.settle(publish);
      publish.resolve({ offset: reply.offset });
    } catch (e) {
      // Disconnected (before or after sending it): resent after the reconnect, with its key;
      // close() and a permanent refusal reject what they drop themselves.
      if (ws !== this.ws || (e.code === 0 && e.temporary)) return;
      if (e.code === 110 && publish.refused < MAX_RATE_RETRIES) {
        // Over the server's rate (this connection's, or the identity's over all its
        // connections): not stored, so it goes again, after a pause.
        publish.refused += 1;
        this.tokens = 0;
        setTimeout(() => { if (ws === this.ws && this.publishes.includes(publish)) this.sendPublish(publish); },
          RATE_RETRY_MS * publish.refused);
        return;
      }
      this.settle(publish);
      publish.reject(e);
    }
  }

  /**
   * Waits until the rate the server announced (`limits.commands_per_second` in the connect
   * reply, in bursts of twice as many) allows one more command: a backlog of publishes made
   * while disconnected goes out at that pace instead of being refused with 110.
   */
  async pace() {
    for (;;) {
      const rate = this.refill();
      if (!rate || this.tokens >= 1) return;
      await new Promise((resolve) => setTimeout(resolve, Math.ceil(((1 - this.tokens) / rate) * 1000)));
    }
  }

  /**
   * Brings the count of commands the server's rate allows now up to date; returns the rate
   * (commands per second), or 0 when the server announced none. Every command sent takes one
   * (in `send`), so the count follows the server's own.
   */
  refill() {
    const rate = Number(this.session?.limits?.commands_per_second);
    if (!(rate > 0)) return 0;
    const now = Date.now();
    this.tokens = Math.min(2 * rate, (this.tokens ?? 2 * rate) + ((now - (this.refilled ?? now)) / 1000) * rate);
    this.refilled = now;
    return rate;
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

  /**
   * Subscribes on the current connection (after connecting, a reconnect, a temporary refusal).
   * Resolves once the reply is in (or the attempt is given up).
   */
  subscribe() {
    const client = this.client;
    if (this.request) return this.request;
    if (this.state !== 'unsubscribed' && this.state !== 'subscribing') return Promise.resolve();
    if (client.state !== 'connected' || client.subs.get(this.channel) !== this) return Promise.resolve();
    // A previous subscription to this channel leaves first: the server would refuse this one
    // (105, already subscribed) while it still counts that one in.
    const before = client.leaving.get(this.channel);
    if (before) {
      this.state = 'subscribing';
      this.waiting ??= before.then(() => {
        this.waiting = null;
        return this.subscribe();
      });
      return this.waiting;
    }
    const command = { op: 'subscribe', channel: this.channel };
    if (this.offset !== null && this.epoch) {
      command.since = this.offset;
      command.epoch = this.epoch;
    }
    this.state = 'subscribing';
    const ws = client.ws;
    // Settles with the connection that granted the subscription, or null: what unsubscribe()
    // waits for when called meanwhile.
    let settle;
    const request = new Promise((resolve) => { settle = resolve; });
    this.request = request;
    client.send(command, (error, reply) => {
      if (this.request === request) this.request = null;
      settle(error ? null : ws);
      this.answered(ws, error, reply);
    });
    return request;
  }

  /** The subscribe's reply (handled as it is read: before the replayed publications). */
  answered(ws, error, reply) {
    const client = this.client;
    // Unsubscribed while the reply was on its way: no handler runs, and unsubscribe() lets go
    // of what the server granted.
    if (this.state === 'removed') return;
    if (error) {
      // Disconnected (or closed): subscribed again after the reconnect, if any.
      if (ws !== client.ws || (error.code === 0 && error.temporary)) return;
      if (error.temporary) {
        const delay = Math.random() * Math.min(20_000, 500 * 2 ** this.attempt++);
        setTimeout(() => { if (client.ws === ws) this.subscribe(); }, delay);
        return;
      }
      this.state = 'failed';
      if (client.subs.get(this.channel) === this) client.subs.delete(this.channel);
      this.call('onError', error);
      return;
    }
    this.attempt = 0;
    this.state = 'subscribed';
    // Channels without a stream of offsets (poll:ID, polls) have neither: both stay null.
    this.epoch = typeof reply.epoch === 'string' ? reply.epoch : null;
    // The replayed publications follow the reply and move the offset as they come; with none,
    // the reply's offset is where the stream stands.
    if (typeof reply.offset === 'number' && !reply.replayed) this.offset = reply.offset;
    this.call('onSubscribed', reply);
    // Publishes that waited for this subscription go now.
    for (const publish of client.publishes) {
      if (!publish.sent && publish.channel === this.channel && client.ws === ws) client.sendPublish(publish);
    }
  }

  publication(message) {
    // The offset is kept before the handler runs: a handler that throws loses nothing on resume.
    if (typeof message.offset === 'number') this.offset = message.offset;
    this.call('onPublication', message);
  }

  /** The server ended the subscription: it is not restored, as after `unsubscribe()`. */
  ended({ code, reason }) {
    this.state = 'removed';
    const client = this.client;
    if (client.subs.get(this.channel) === this) client.subs.delete(this.channel);
    this.call('onUnsubscribed', { code, reason });
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

  /**
   * Stops following the channel, for good: no handler runs from now on, the subscription is
   * not restored after a reconnect, and the channel may be subscribed to again at once.
   * Resolves once the server has let go: at once when there is nothing to undo (not
   * subscribed, disconnected: the server forgot the subscription with the connection);
   * with a subscribe on its way, after its reply (then the unsubscribe, if it was granted).
   * Rejects only if the server refuses or does not answer the unsubscribe. Calling it again
   * returns the same promise.
   */
  unsubscribe() {
    if (this.ending) return this.ending;
    const client = this.client;
    const channel = this.channel;
    const subscribed = this.state === 'subscribed' && client.state === 'connected';
    const request = this.request;
    this.state = 'removed';
    if (client.subs.get(channel) === this) client.subs.delete(channel);
    const previous = client.leaving.get(channel);
    const ending = (async () => {
      let ws = subscribed ? client.ws : null;
      if (request) ws = await request; // the connection that granted it, or null
      if (!ws || ws !== client.ws) return;
      try {
        await client.call({ op: 'unsubscribe', channel });
      } catch (e) {
        if (ws === client.ws) throw e; // else disconnected: nothing left to undo
      }
    })();
    this.ending = ending;
    // A subscription on the channel before this one may still be leaving: wait for both.
    const done = Promise.all([previous, ending]).then(() => {}, () => {});
    client.leaving.set(channel, done);
    done.then(() => { if (client.leaving.get(channel) === done) client.leaving.delete(channel); });
    return ending;
  }
}
