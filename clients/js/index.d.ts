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
  /** An API token, sent as `?token=` (a page that logged in needs none: its cookie goes along). */
  token?: string;
  /** Called before every connection attempt for a fresh token (preferred over `token`). */
  getToken?: () => string | Promise<string>;
  /** A guest's nickname, when the server allows guests. */
  name?: string;
  /** The WebSocket constructor (default: the global one). */
  WebSocket?: new (url: string, protocols: string[]) => WebSocket;
  /** Backoff between reconnects: a random delay up to min(maxDelay, minDelay × 2^attempt). Defaults 500 and 20,000 ms. */
  minDelay?: number;
  maxDelay?: number;
  /** How long a command waits for its reply, and the opening handshake for its end, in ms (default 10,000). */
  timeout?: number;
}

/** What the server says on connect. */
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
}

export interface ChannelEvent<T = unknown> {
  type: 'event';
  channel: string;
  name: string;
  user: string;
  data: T;
}

export interface Subscribed {
  epoch: string;
  /** The offset of the channel's latest publication. */
  offset: number;
  /** Publications replayed right after this reply. */
  replayed: number;
  /** On a resubscription: true when exactly the missed publications follow; false when the
   * client's state is stale and the recent history follows instead (reset your view). */
  recovered?: boolean;
  presence?: Member[];
}

export interface Member {
  user: string;
  clients: number;
}

export interface Handlers<T = unknown> {
  onSubscribed?: (reply: Subscribed) => void;
  onPublication?: (publication: Publication<T>) => void;
  onJoin?: (change: PresenceChange) => void;
  onLeave?: (change: PresenceChange) => void;
  onEvent?: (event: ChannelEvent) => void;
  /** A permanent refusal of the subscription (unknown channel, permission denied…). */
  onError?: (error: TetherError) => void;
}

export interface Disconnected {
  code: number;
  reason: string;
  /** Whether the client will reconnect by itself. */
  reconnect: boolean;
}

export interface ClientEvents {
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
  connect(): this;
  close(): void;
  subscribe<T = unknown>(channel: string, handlers?: Handlers<T>): Subscription<T>;
  subscription(channel: string): Subscription | undefined;
  /** Publishes to a channel this client is subscribed to. */
  publish(channel: string, data: unknown): Promise<{ offset?: number }>;
}

export class Subscription<T = unknown> {
  readonly channel: string;
  readonly offset: number | null;
  readonly epoch: string | null;
  readonly state: 'unsubscribed' | 'subscribing' | 'subscribed' | 'failed' | 'removed';
  /** Resolves once stored (`offset`: its place in the stream) or, for a poll, counted. */
  publish(data: T): Promise<{ offset?: number }>;
  event(name: string, data?: unknown): Promise<void>;
  presence(): Promise<Member[]>;
  history(options?: { since?: number; limit?: number }): Promise<{ epoch: string; offset: number; publications: Publication<T>[] }>;
  unsubscribe(): Promise<void>;
}
