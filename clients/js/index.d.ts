// Type declarations of tether-client (tether.v1, docs/protocol.md).

/** The subprotocol the client speaks: "tether.v1". */
export const PROTOCOL: string;

/** A refusal or failure with the protocol's code. */
export class TetherError extends Error {
  /** The error code (100–199), a close code, 0 when not connected or timed out. */
  readonly code: number;
  /** Whether trying again later can succeed. */
  readonly temporary: boolean;
}

/** Whether reconnecting can help after a close with `code`. */
export function canReconnect(code: number, hasTokenSource?: boolean): boolean;

export interface ClientOptions {
  /**
   * An API token, sent in the `connect` command (never in the URL, which servers and proxies
   * log). A page that logged in needs none: its cookie goes along.
   */
  token?: string;
  /** Called before every connection attempt for a fresh token (preferred over `token`). */
  getToken?: () => string | Promise<string>;
  /** A guest's nickname, when the server allows guests. */
  name?: string;
  /**
   * Public information about this connection (an object, at most 1 KiB as JSON), sent with
   * `connect`: others see it in presence and in this connection's join.
   */
  info?: Record<string, unknown>;
  /** The WebSocket constructor (default: the global one). */
  WebSocket?: new (url: string, protocols: string[]) => WebSocket;
  /** Backoff between reconnects: a random delay up to min(maxDelay, minDelay × 2^attempt). Defaults 500 and 20,000 ms. */
  minDelay?: number;
  maxDelay?: number;
  /** How long a command waits for its reply, and the opening handshake for its end, in ms (default 10,000). */
  timeout?: number;
}

/** What the server says on connect (replies never carry the protocol's `id`). */
export interface Session {
  client: string;
  user: string;
  guest: boolean;
  limits: { channels: number; commands_per_second: number; message_size: number };
}

/** A publication of a channel. */
export interface Publication<T = unknown> {
  type: 'pub';
  channel: string;
  /** Its place in the channel's stream (absent for channels without one, like broadcast). */
  offset?: number;
  user?: string;
  ts?: string;
  data: T;
}

export interface PresenceChange {
  type: 'join' | 'leave';
  channel: string;
  user: string;
  /** Users in the channel now. */
  count: number;
  /** On a join: the `info` of the connection that joined, if it attached one. */
  info?: Record<string, unknown>;
}

export interface ChannelEvent<T = unknown> {
  type: 'event';
  channel: string;
  name: string;
  user: string;
  data: T;
}

/** The subscribe reply (without its `id`). */
export interface Subscribed {
  /** The stream's epoch (absent for channels without offsets: `poll:ID`, `polls`). */
  epoch?: string;
  /** The offset of the channel's latest publication (absent for channels without offsets). */
  offset?: number;
  /** Publications replayed right after this reply. */
  replayed: number;
  /** On a resubscription: true when exactly the missed publications follow; false when the
   * client's state is stale and the recent history follows instead (reset your view). */
  recovered?: boolean;
  presence?: Member[];
  /** `poll:ID`: the poll's state, this client's vote, whether it may vote. */
  poll?: unknown;
  vote?: string | null;
  can_vote?: boolean;
  /** `polls`: the latest polls, newest first. */
  polls?: unknown[];
}

export interface Member {
  user: string;
  /** The user's connections (a user on other nodes counts one per node). */
  clients: number;
  /** The distinct `info` their connections attached, at most 4 (absent when none did). */
  info?: Record<string, unknown>[];
}

/** A subscription's handlers. None runs once `unsubscribe()` is called. */
export interface Handlers<T = unknown> {
  onSubscribed?: (reply: Subscribed) => void;
  onPublication?: (publication: Publication<T>) => void;
  onJoin?: (change: PresenceChange) => void;
  onLeave?: (change: PresenceChange) => void;
  onEvent?: (event: ChannelEvent) => void;
  /** A permanent refusal of the subscription (unknown channel, permission denied…). */
  onError?: (error: TetherError) => void;
  /**
   * The server ended the subscription (code 2000): it is removed, as by `unsubscribe()`, and
   * not restored after a reconnect; the channel may be subscribed to again.
   */
  onUnsubscribed?: (ended: { code: number; reason: string }) => void;
}

export interface Disconnected {
  /** The close code; 0 when no connection was made (`getToken()` failed, a bad URL). */
  code: number;
  reason: string;
  /** Whether the client will reconnect by itself. */
  reconnect: boolean;
}

/**
 * The client's events. Each comes after `state` has changed: in a listener, `state` reads
 * `connecting`, `connected`, `disconnected` (`closed` when `reconnect` is false) or `closed`.
 */
export interface ClientEvents {
  /** `attempt`: 0 for the first attempt (and after `connect()` or `reconnect()`), then 1, 2… */
  connecting: { attempt: number };
  connected: Session;
  disconnected: Disconnected;
  /** Closed for good: by `close()`, or by a refusal that retrying cannot heal. */
  closed: { code: number; reason: string };
  error: Error;
  broadcast: Publication<{ text: string }>;
}

export class Client {
  constructor(url: string, options?: ClientOptions);
  readonly state: 'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed';
  readonly session: Session | null;
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): this;
  off<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): this;
  /** Opens the connection (again after `close()` or a refusal). */
  connect(): this;
  /**
   * Tries again now instead of waiting out the backoff, when `disconnected`: the backoff
   * starts over; subscriptions and pending publishes carry on as after any reconnect.
   * Does nothing when `connecting`, `connected`, `idle` or `closed` (use `connect()`).
   */
  reconnect(): this;
  /** Closes for good: pending commands and publishes fail, nothing reconnects. */
  close(): void;
  subscribe<T = unknown>(channel: string, handlers?: Handlers<T>): Subscription<T>;
  subscription(channel: string): Subscription | undefined;
  /**
   * Publishes to a channel this client is subscribed to, at the pace the server announced
   * (`limits.commands_per_second`); one refused for the rate (110) is tried again, up to 8
   * times, before the promise rejects.
   */
  publish(channel: string, data: unknown): Promise<{ offset?: number }>;
}

export class Subscription<T = unknown> {
  readonly channel: string;
  /** The offset of the last publication received; null before any, and for channels without offsets (`poll:ID`, `polls`). */
  readonly offset: number | null;
  /** The stream's epoch; null before the first reply, and for channels without offsets. */
  readonly epoch: string | null;
  /** `removed` from the call to `unsubscribe()` on; `failed` after a permanent refusal. */
  readonly state: 'unsubscribed' | 'subscribing' | 'subscribed' | 'failed' | 'removed';
  /** Resolves once stored (`offset`: its place in the stream) or, for a poll, counted. */
  publish(data: T): Promise<{ offset?: number }>;
  event(name: string, data?: unknown): Promise<void>;
  presence(): Promise<Member[]>;
  history(options?: { since?: number; limit?: number }): Promise<{ epoch: string; offset: number; publications: Publication<T>[] }>;
  /**
   * Stops following the channel for good: no handler runs from now on, nothing is restored
   * after a reconnect, and the channel may be subscribed to again at once (that subscribe
   * follows this one's unsubscribe). Resolves once the server has let go: at once when
   * disconnected or not subscribed; with a subscribe on its way, after its reply (and the
   * unsubscribe, if it was granted). Rejects only when the server refuses or does not answer
   * the unsubscribe. Calling it again returns the same promise.
   */
  unsubscribe(): Promise<void>;
}
