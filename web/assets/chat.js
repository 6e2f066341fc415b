// The chat page (GET /): several rooms open at once on the page's one connection to /ws, each a
// `room:NAME` subscription that tether-client resumes from its own offset after a reconnect, so
// no message is lost or shown twice (offsets are also deduplicated here, defensively). One room
// is shown; the others count what arrives unread. Who is here comes from the subscription's
// presence and join/leave pushes, "typing…" from ephemeral events.
import {
  ApiError, Connection, ConnStatus, NICK_RE, ROOM_RE, announce, api, byId, connectName,
  currentIdentity, describeRefusal, el, hashParams, initHeader, isNearBottom, nickProblem,
  onIdentityChange, refreshIdentity, storeNick, storedNick, timeElement,
} from './common.js';

const ROOM_KEY = 'tether.room';   // the room shown
const ROOMS_KEY = 'tether.rooms'; // the rooms open, in order
const ROOMS_REFRESH_MS = 15000;
const MAX_OPEN = 20;
/** Characters in a room message (docs/protocol.md, "Channels"). */
const MAX_TEXT = 2000;
/** The character count shows from here on, before the limit bites. */
const COUNT_FROM = 1800;
/** While typing, one `typing` event at most this often. */
const TYPING_EVERY_MS = 2500;
/** Someone's "typing" lapses after this long without another event (theirs may be lost). */
const TYPING_SHOWN_MS = 6000;

const ui = {
  joinForm: byId('join-form'),
  roomInput: byId('room-input'),
  roomSuggestions: byId('room-suggestions'),
  nickField: byId('nick-field'),
  nick: byId('nick'),
  guestsOff: byId('guests-off'),
  join: byId('join'),
  joinError: byId('join-error'),
  openRooms: byId('open-rooms'),
  openEmpty: byId('open-empty'),
  rooms: byId('rooms'),
  roomsEmpty: byId('rooms-empty'),
  members: byId('members'),
  memberCount: byId('member-count'),
  membersHint: byId('members-hint'),
  sidebar: byId('sidebar'),
  scrim: byId('scrim'),
  drawerToggle: byId('drawer-toggle'),
  drawerClose: byId('drawer-close'),
  unreadTotal: byId('unread-total'),
  room: byId('room'),
  roomTitle: byId('room-title'),
  conn: byId('conn-state'),
  reconnect: byId('reconnect-now'),
  problem: byId('conn-problem'),
  messages: byId('messages'),
  empty: byId('messages-empty'),
  emptyText: byId('messages-empty-text'),
  startJoin: byId('start-join'),
  typing: byId('typing'),
  joinBar: byId('join-bar'),
  joinBarText: byId('join-bar-text'),
  joinBarButton: byId('join-bar-button'),
  composer: byId('composer'),
  input: byId('message-input'),
  send: byId('send'),
  composerError: byId('composer-error'),
  charCount: byId('char-count'),
};

/** A room this page has open: its subscription and what it shows. */
class Room {
  constructor(name) {
    this.name = name;
    this.sub = null;          // the room:NAME subscription of the current client
    this.failed = '';         // why the server refused the subscription, if it did
    this.items = [];          // the <li>s of its log (messages and notices), in order
    this.offsets = new Set(); // offsets of the messages shown
    this.epoch = null;        // the stream those offsets belong to
    this.members = new Set();
    this.unread = 0;
    this.loaded = false;      // the first history has arrived
    this.preview = false;     // what it shows was read over HTTP while watching (not joined)
    this.previewing = null;   // the preview's request on its way
    this.replaying = 0;       // publications of the latest subscribe's replay still to come
    this.caughtUp = 0;        // of those, new ones: missed while away
    this.exact = true;        // the replay follows on from what we show (not after a reset)
    this.typing = new Map();  // user → timer that ends their "typing"
    this.typingSentAt = 0;    // when we last said we are typing here
    this.typingOn = false;
    this.draft = '';
    this.scroll = null;       // scrollTop when last left; null: at the end
  }

  get channel() {
    return `room:${this.name}`;
  }
}

const chat = {
  nick: storedNick(),    // the guest nickname
  me: null,              // our name on the connection, from its `connected`
  rooms: new Map(),      // name → Room, in the order opened
  current: null,         // the Room shown
  // No name to chat with yet (a guest without a nickname, or guests off and not logged in):
  // the page connects without an identity, for broadcasts, and reads the room shown over HTTP.
  watching: false,
  listed: [],            // the last GET /api/rooms answer
};

/** Messages read before joining: what joining would replay. */
const PREVIEW_MESSAGES = 50;

const status = new ConnStatus(ui.conn);
const conn = new Connection({
  status,
  onClient: subscribeAll,
  onState: handleState,
  onRefused: handleRefused,
});

// ---------------------------------------------------------------------------------------------
// The connection and its rooms

/** A new client: follow every open room on it (the server replays each room's recent history). */
function subscribeAll(client) {
  chat.me = null;
  client.on('connected', (session) => {
    if (conn.client !== client) return;
    chat.me = session.user;
    ui.problem.textContent = '';
    markOwnMessages();
  });
  // A watcher may not subscribe to rooms (error 103): it reads the room shown over HTTP.
  if (chat.watching) return;
  for (const room of chat.rooms.values()) subscribe(client, room);
}

function subscribe(client, room) {
  room.failed = '';
  const sub = client.subscribe(room.channel, {
    // Once unsubscribed (the room left, even with the reply on its way), tether-client runs
    // none of these again.
    onSubscribed: (reply) => subscribed(room, reply),
    onPublication: (pub) => publication(room, pub),
    onJoin: ({ user }) => presence(room, user, true),
    onLeave: ({ user }) => presence(room, user, false),
    onEvent: (event) => roomEvent(room, event),
    onError: (error) => {
      if (room.sub !== sub) return;
      room.sub = null;
      room.failed = error.message;
      addNotice(room, `The server refused this room: ${error.message}`, 'error');
      renderComposer();
    },
  });
  room.sub = sub;
}

/** (Re)connected to a room: where its stream stands, who is here, what replay follows. */
function subscribed(room, reply) {
  if (room.preview) {
    // Joined: the subscription's replay takes over from what was read before.
    clearMessages(room);
    room.preview = false;
    room.loaded = false;
  }
  const lost = reply.recovered === false || (room.epoch !== null && reply.epoch !== room.epoch);
  if (lost && room.offsets.size) {
    // What we show cannot be completed exactly (another stream, or too much missed): start
    // the list again from the recent history that follows.
    clearMessages(room);
    addNotice(room, 'Some messages could not be recovered (the server’s history was reset, or too much was missed): showing the recent history.', 'warn');
  }
  room.epoch = reply.epoch ?? null;
  room.replaying = Number(reply.replayed) || 0;
  room.caughtUp = 0;
  room.exact = reply.recovered !== false;
  room.members = new Set((reply.presence ?? []).map((m) => m.user));
  renderRoomList();
  for (const timer of room.typing.values()) clearTimeout(timer);
  room.typing.clear();
  if (room === chat.current) {
    ui.messages.setAttribute('aria-busy', String(room.replaying > 0));
    renderMembers();
    renderTyping();
  }
  if (room.replaying === 0) replayDone(room);
  renderComposer();
  refreshRoomsSoon();
}

function publication(room, pub) {
  const replayed = room.replaying > 0;
  if (replayed) room.replaying -= 1;
  const text = typeof pub.data?.text === 'string' ? pub.data.text : '';
  if (typeof pub.offset === 'number' && !room.offsets.has(pub.offset)) {
    addMessage(room, pub, text);
    stopShowingTyping(room, pub.user);
    // After a reset the replay is recent history, not news: it counts as neither.
    if (room.loaded && pub.user !== chat.me && (!replayed || room.exact)) {
      if (replayed) room.caughtUp += 1;
      if (room !== chat.current || document.hidden) {
        // The shown room counts too while the tab is in the background (in the title).
        room.unread += 1;
        renderOpenRooms();
      } else if (!replayed) {
        // Only live messages of others in the room shown are read out: a screen reader user
        // is not flooded by history or by what they wrote.
        announce(`${pub.user}: ${text}`);
      }
    }
  }
  if (replayed && room.replaying === 0) replayDone(room);
}

function replayDone(room) {
  const first = !room.loaded;
  room.loaded = true;
  if (room.caughtUp) {
    const n = room.caughtUp;
    addNotice(room, `Reconnected — caught up on ${n} missed message${n === 1 ? '' : 's'}.`, 'system');
    room.caughtUp = 0;
  }
  if (room === chat.current) {
    ui.messages.removeAttribute('aria-busy');
    renderEmpty();
    if (first) scrollToEnd();
  }
}

function presence(room, user, joined) {
  if (joined) room.members.add(user);
  else {
    room.members.delete(user);
    stopShowingTyping(room, user);
  }
  if (room === chat.current) renderMembers();
  renderRoomList();
  refreshRoomsSoon();
}

function roomEvent(room, event) {
  if (event.name !== 'typing' || !event.user || event.user === chat.me) return;
  if (event.data?.on === false) {
    stopShowingTyping(room, event.user);
    return;
  }
  clearTimeout(room.typing.get(event.user));
  room.typing.set(event.user, setTimeout(() => stopShowingTyping(room, event.user), TYPING_SHOWN_MS));
  if (room === chat.current) renderTyping();
}

function stopShowingTyping(room, user) {
  if (!room.typing.has(user)) return;
  clearTimeout(room.typing.get(user));
  room.typing.delete(user);
  if (room === chat.current) renderTyping();
}

function handleState(state, info) {
  document.body.dataset.conn = state;
  // Who is here is only known while connected: stale while away.
  ui.members.classList.toggle('stale', state !== 'live');
  ui.reconnect.hidden = state !== 'reconnecting';
  renderComposer();
  renderEmpty();
}

/** The client stopped for good: say why once, and do not retry. */
async function handleRefused(error) {
  const { code } = error;
  ui.problem.textContent = describeRefusal(code, error.message, chat.nick);
  if (code === 4503) {
    conn.label('Nickname refused');
    ui.joinError.textContent = 'Pick another nickname.';
    ui.nick.setAttribute('aria-invalid', 'true');
  } else if (code === 4504 || code === 4501 || code === 4502 || code === 1008) {
    // Our idea of who we are is out of date (logged out elsewhere, guests turned off): ask
    // again; a change reconnects as whoever we are now.
    conn.label(code === 4504 ? 'Guests not allowed' : 'Not logged in');
    await refreshIdentity();
  } else {
    // Something else stopped it (a protocol error, a WebSocket-level close): a person may try.
    ui.reconnect.hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Sending

/** Why `text` cannot be sent as it is, or ''. */
function textProblem(text) {
  const length = [...text].length;
  if (length > MAX_TEXT) {
    return `Too long to send: ${length.toLocaleString()} characters, the limit is ${MAX_TEXT.toLocaleString()}. Shorten it or split it in two; your text is still here.`;
  }
  const limit = conn.client?.session?.limits?.message_size;
  const size = new TextEncoder().encode(JSON.stringify({ text })).length + 200; // + the command around it
  if (limit && size > limit) return `Too large to send (the server takes ${limit.toLocaleString()} bytes at most): shorten it; your text is still here.`;
  return '';
}

function showComposerError(text) {
  ui.composerError.textContent = text;
  if (text) ui.input.setAttribute('aria-invalid', 'true');
  else ui.input.removeAttribute('aria-invalid');
}

async function send() {
  const room = chat.current;
  const text = ui.input.value;
  if (!room || !text.trim()) return;
  const problem = textProblem(text);
  if (problem) {
    showComposerError(problem);
    ui.input.focus();
    return;
  }
  if (!room.sub || conn.client?.state === 'closed') {
    showComposerError('Not connected: your message was not sent.');
    return;
  }
  showComposerError('');
  ui.input.value = '';
  room.draft = '';
  autosize();
  renderCount();
  stopTyping(room);
  // Shown at once as "sending"; the client sends it once connected and resends it (same
  // idempotency key) after a lost reply, so it is stored once however the network behaves.
  const pending = addPending(room, text);
  try {
    const { offset } = await room.sub.publish({ text });
    if (room.offsets.has(offset)) removeItem(room, pending);
    else pending.dataset.offset = String(offset); // the publication replaces it
  } catch (err) {
    removeItem(room, pending);
    // The draft comes back, unless something new was typed meanwhile.
    if (room === chat.current) {
      if (!ui.input.value) {
        ui.input.value = text;
        room.draft = text;
        autosize();
        renderCount();
      }
      showComposerError(`Not sent: ${err.message}.`);
    } else {
      if (!room.draft) room.draft = text;
      addNotice(room, `A message was not sent: ${err.message}. It is back in the composer.`, 'error');
    }
  }
}

/** Tells the room we are typing, at most every TYPING_EVERY_MS. */
function typingPulse(room) {
  if (!room?.sub || room.sub.state !== 'subscribed' || !conn.live) return;
  const now = Date.now();
  if (now - room.typingSentAt < TYPING_EVERY_MS) return;
  room.typingSentAt = now;
  room.typingOn = true;
  room.sub.event('typing', { on: true }).catch(() => {}); // ephemeral: a lost one lapses anyway
}

function stopTyping(room) {
  if (!room?.typingOn) return;
  room.typingOn = false;
  room.typingSentAt = 0;
  if (room.sub?.state === 'subscribed' && conn.live) room.sub.event('typing', { on: false }).catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Rendering a room's log

const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

/** `text` as nodes, http(s) addresses made links (never markup: text nodes and attributes only). */
function linkify(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    const url = trimUrl(match[0]);
    let parsed;
    try {
      parsed = new URL(url);
    } catch {
      continue;
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') continue;
    if (match.index > last) nodes.push(text.slice(last, match.index));
    nodes.push(el('a', { href: parsed.href, target: '_blank', rel: 'noopener noreferrer', text: url }));
    last = match.index + url.length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

/** Drops what ends a sentence rather than the address: "see https://x.org/a)." → "https://x.org/a". */
function trimUrl(url) {
  const pairs = { ')': '(', ']': '[', '}': '{' };
  for (;;) {
    const end = url.at(-1);
    if ('.,;:!?*'.includes(end)) {
      url = url.slice(0, -1);
    } else if (pairs[end] && url.split(pairs[end]).length < url.split(end).length) {
      url = url.slice(0, -1); // a closing bracket without its opening one in the address
    } else {
      return url;
    }
  }
}

function messageItem(pub, text) {
  const mine = chat.me !== null && pub.user === chat.me;
  return el('li', {
    class: mine ? 'msg mine' : 'msg',
    dataset: { id: String(pub.offset), user: String(pub.user ?? ''), mine: String(mine), guest: String(pub.guest === true) },
  },
  el('div', { class: 'msg-meta' },
    el('span', { class: 'msg-user', text: String(pub.user ?? '?') }),
    // A guest's nickname is anyone's: said beside it, so that no guest passes for a user.
    pub.guest === true ? el('span', { class: 'guest-tag', title: 'A guest: a nickname, not a registered user', text: 'guest' }) : null,
    el('span', { class: 'you-tag', text: ' (you)' }),
    ' ',
    timeElement(pub.ts)),
  el('p', { class: 'msg-text' }, ...linkify(text)));
}

function addMessage(room, pub, text) {
  const offset = pub.offset;
  room.offsets.add(offset);
  const item = messageItem(pub, text);
  // Our own message arrived: its "sending" placeholder goes.
  const pending = room.items.find((i) => i.classList.contains('msg-pending') && i.dataset.offset === String(offset));
  if (pending) removeItem(room, pending);
  // Offsets arrive in order, but a replay after a new client may bring older ones: each goes
  // before the first later message; a new one at the end, before our messages still sending.
  let index = room.items.findIndex((i) => i.classList.contains('msg') && Number(i.dataset.id) > offset);
  if (index === -1) {
    index = room.items.length;
    while (index > 0 && room.items[index - 1].classList.contains('msg-pending')) index -= 1;
  }
  insertItem(room, item, index);
}

function addPending(room, text) {
  const item = el('li', { class: 'msg-pending mine', dataset: { pending: 'true' } },
    el('div', { class: 'msg-meta' }, el('span', { class: 'pending-label', text: 'Sending…' })),
    el('p', { class: 'msg-text' }, ...linkify(text)));
  insertItem(room, item, room.items.length, { stick: true });
  return item;
}

/** A line that is not a message: connection news, refusals. */
function addNotice(room, text, kind) {
  const item = el('li', { class: `notice notice-${kind}`, dataset: { kind } }, el('span', { text }));
  insertItem(room, item, room.items.length);
}

function insertItem(room, item, index, { stick = false } = {}) {
  const shown = room === chat.current;
  const atEnd = shown && isNearBottom(ui.messages);
  const next = room.items[index] ?? null;
  room.items.splice(index, 0, item);
  if (shown) {
    ui.messages.insertBefore(item, next && next.parentNode === ui.messages ? next : null);
    renderEmpty();
    if (atEnd || stick) scrollToEnd();
  }
}

function removeItem(room, item) {
  room.items = room.items.filter((i) => i !== item);
  item.remove();
}

/** Forgets the room's messages (notices and unsent ones stay). */
function clearMessages(room) {
  room.items = room.items.filter((i) => {
    if (!i.classList.contains('msg')) return true;
    i.remove();
    return false;
  });
  room.offsets.clear();
  room.caughtUp = 0;
}

function markOwnMessages() {
  for (const room of chat.rooms.values()) {
    for (const node of room.items) {
      if (!node.classList.contains('msg')) continue;
      const mine = chat.me !== null && node.dataset.user === chat.me;
      node.classList.toggle('mine', mine);
      node.dataset.mine = String(mine);
    }
  }
  renderMembers();
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// Rendering the rest

/** What the visitor lacks to take part: 'nickname', 'login' or '' (nothing). */
function missing() {
  const identity = currentIdentity();
  if (connectName(identity, chat.nick) !== null) return '';
  return identity.guests ? 'nickname' : 'login';
}

function renderEmpty() {
  const room = chat.current;
  const hasMessages = room?.items.some((i) => i.classList.contains('msg') || i.classList.contains('msg-pending'));
  const lack = missing();
  renderJoinBar();
  if (!room) {
    ui.emptyText.textContent = lack === 'login'
      ? 'Log in at the top of the page to chat: this server does not let guests in.'
      : lack === 'nickname' ? 'Choose a nickname and a room to start chatting.' : 'Choose a room to start chatting.';
    ui.startJoin.textContent = lack === 'nickname' ? 'Choose a nickname' : 'Choose a room';
    ui.startJoin.hidden = lack === 'login';
    ui.empty.hidden = false;
    return;
  }
  ui.startJoin.hidden = true;
  if (room.failed) ui.emptyText.textContent = `This room is not available: ${room.failed}`;
  else if (room.loaded && lack) ui.emptyText.textContent = `No messages in #${room.name} yet.`;
  else if (room.loaded) ui.emptyText.textContent = 'No messages yet. Say hello!';
  else if (conn.client?.state === 'closed') ui.emptyText.textContent = 'Not connected.';
  else ui.emptyText.textContent = 'Loading…';
  ui.empty.hidden = Boolean(hasMessages);
}

/** While watching, the composer's place says what joining needs, with a button to it. */
function renderJoinBar() {
  const room = chat.current;
  const lack = room ? missing() : '';
  ui.joinBar.hidden = !lack;
  ui.composer.hidden = Boolean(lack);
  if (!lack) return;
  ui.joinBarText.textContent = lack === 'login'
    ? `You are reading #${room.name}. This server lets only registered users write: log in to join.`
    : `You are reading #${room.name}. Choose a nickname to join and write.`;
  ui.joinBarButton.textContent = lack === 'login' ? 'Log in' : `Join #${room.name}`;
}

function renderMembers() {
  const room = chat.current;
  // Before joining, who is here is not told (presence is for members): the count is the list's.
  const outside = Boolean(room) && !room.sub;
  ui.membersHint.hidden = !outside;
  if (outside) {
    ui.members.replaceChildren();
    ui.memberCount.textContent = String(listedMembers(room.name));
    return;
  }
  const names = [...(room?.members ?? [])].sort((a, b) => a.localeCompare(b));
  ui.members.replaceChildren(...names.map((name) => el('li', {
    class: name === chat.me ? 'member me' : 'member',
    dataset: { user: name },
  },
  el('span', { class: 'avatar', 'aria-hidden': 'true', text: name.slice(0, 1).toUpperCase() }),
  el('span', { class: 'member-name', text: name }),
  name === chat.me ? el('span', { class: 'you-tag', text: ' (you)' }) : null)));
  ui.memberCount.textContent = String(names.length);
}

function renderTyping() {
  const names = [...(chat.current?.typing.keys() ?? [])].sort((a, b) => a.localeCompare(b));
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = `${names[0]}, ${names[1]} and ${names.length - 2} more are typing…`;
  ui.typing.textContent = text;
  ui.typing.dataset.users = names.join(' ');
}

function renderOpenRooms() {
  ui.openRooms.replaceChildren(...[...chat.rooms.values()].map((room) => {
    const current = room === chat.current;
    const unread = room.unread > 0 && !current;
    const link = el('a', {
      class: 'room-link',
      href: `#room=${encodeURIComponent(room.name)}`,
      'aria-current': current ? 'true' : null,
    },
    el('span', { class: 'room-name', text: `#${room.name}` }),
    unread ? el('span', { class: 'badge unread', dataset: { unread: String(room.unread) }, 'aria-hidden': 'true', text: String(room.unread) }) : null,
    unread ? el('span', { class: 'sr-only', text: ` (${room.unread} unread)` }) : null);
    const leave = el('button', {
      type: 'button',
      class: 'btn btn-quiet btn-small leave-room',
      'aria-label': `Leave #${room.name}`,
      title: `Leave #${room.name}`,
      text: '×',
      onclick: () => leaveRoom(room),
    });
    return el('li', { class: 'open-room', dataset: { room: room.name } }, link, leave);
  }));
  ui.openEmpty.hidden = chat.rooms.size > 0;
  const others = [...chat.rooms.values()].reduce((n, r) => n + (r === chat.current ? 0 : r.unread), 0);
  const total = others + (chat.current?.unread ?? 0);
  ui.unreadTotal.hidden = others === 0;
  ui.unreadTotal.replaceChildren(
    el('span', { 'aria-hidden': 'true', text: String(others) }),
    el('span', { class: 'sr-only', text: ` (${others} unread in other rooms)` }),
  );
  document.title = chat.current
    ? `${total ? `(${total}) ` : ''}#${chat.current.name} · Chat · tether`
    : 'Chat · tether';
}

function renderComposer() {
  const room = chat.current;
  const usable = Boolean(room?.sub) && Boolean(conn.client) && conn.client.state !== 'closed';
  ui.send.disabled = !usable;
  const identity = currentIdentity();
  if (!room) ui.input.placeholder = 'Join a room to write';
  else if (room.failed) ui.input.placeholder = 'This room refused you';
  else if (!conn.client && identity.guest && !identity.guests) ui.input.placeholder = `Log in to write in #${room.name}`;
  else if (!conn.client) ui.input.placeholder = `Choose a nickname to write in #${room.name}`;
  else if (conn.client.state === 'closed') ui.input.placeholder = 'Not connected';
  else if (conn.state === 'live') ui.input.placeholder = `Message #${room.name} — Enter sends`;
  else ui.input.placeholder = 'Not connected — what you send goes once the connection is back';
}

function renderCount() {
  const length = [...ui.input.value].length;
  ui.charCount.hidden = length < COUNT_FROM;
  ui.charCount.textContent = `${length.toLocaleString()} / ${MAX_TEXT.toLocaleString()}`;
  ui.charCount.classList.toggle('over', length > MAX_TEXT);
  if (length <= MAX_TEXT && ui.composerError.textContent.startsWith('Too')) showComposerError('');
}

function autosize() {
  ui.input.style.height = 'auto';
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 160)}px`;
}

let roomsRequest = 0;

async function refreshRooms() {
  // Several requests may overlap (page load, presence, the timer): only the newest answer is
  // shown, so a slow older one never puts back a stale list.
  const request = ++roomsRequest;
  let rooms;
  try {
    // The largest page: the busiest rooms are looked for among all of them, not the first 100 by name.
    rooms = await api('/api/rooms?limit=1000');
    if (request !== roomsRequest) return;
  } catch (err) {
    if (request !== roomsRequest) return;
    ui.roomsEmpty.textContent = err instanceof ApiError && err.status ? `Rooms: ${err.message}` : 'Cannot load the rooms.';
    ui.roomsEmpty.hidden = false;
    return;
  }
  chat.listed = Array.isArray(rooms) ? rooms.filter((r) => typeof r?.room === 'string') : [];
  ui.roomSuggestions.replaceChildren(...chat.listed.map((r) => el('option', { value: r.room })));
  renderRoomList();
  if (chat.current && !chat.current.sub) renderMembers();
}

/** People in ROOM: whom our subscription sees when we have one, else what the list says. */
function listedMembers(name) {
  const room = chat.rooms.get(name);
  if (room?.sub && room.loaded) return room.members.size;
  return Number(chat.listed.find((r) => r.room === name)?.members ?? 0) || 0;
}

/**
 * The active rooms: those with someone in them, the busiest first (people, then messages).
 * A room we follow counts whom its presence shows, so the list agrees with "Here now".
 */
function renderRoomList() {
  const rooms = chat.listed
    .map((r) => ({ room: r.room, members: listedMembers(r.room), last: Number(r.last_id ?? 0) || 0 }))
    .filter((r) => r.members > 0);
  for (const room of chat.rooms.values()) {
    const members = listedMembers(room.name);
    if (members > 0 && !rooms.some((r) => r.room === room.name)) rooms.push({ room: room.name, members, last: 0 });
  }
  rooms.sort((a, b) => b.members - a.members || b.last - a.last || a.room.localeCompare(b.room));
  ui.rooms.replaceChildren(...rooms.map((r) => {
    const members = r.members;
    return el('li', {}, el('a', {
      class: 'room-link',
      href: `#room=${encodeURIComponent(r.room)}`,
      dataset: { room: r.room },
      'aria-current': r.room === chat.current?.name ? 'true' : null,
    },
    el('span', { class: 'room-name', text: `#${r.room}` }),
    el('span', { class: 'badge', title: `${members} here`, 'aria-hidden': 'true', text: String(members) }),
    el('span', { class: 'sr-only', text: ` (${members} here)` })));
  }));
  ui.roomsEmpty.textContent = 'No one is chatting right now.';
  ui.roomsEmpty.hidden = rooms.length > 0;
}

/**
 * Reads the recent history of ROOM over HTTP (GET /api/rooms/NAME/messages?last=N) while
 * watching: a public room can be read before joining. Read again now and then; joining
 * replaces it with the subscription's own replay.
 */
async function loadPreview(room) {
  if (!chat.watching || !room || room.sub || room.previewing) return;
  const request = api(`/api/rooms/${encodeURIComponent(room.name)}/messages?last=${PREVIEW_MESSAGES}`);
  room.previewing = request;
  let messages;
  try {
    messages = await request;
  } catch (err) {
    if (room.previewing === request && room === chat.current && !room.loaded) {
      ui.emptyText.textContent = `Cannot read #${room.name}: ${err.message}`;
    }
    return;
  } finally {
    if (room.previewing === request) room.previewing = null;
  }
  // Joined, left or no longer watching meanwhile: the answer is stale.
  if (!chat.watching || room.sub || chat.rooms.get(room.name) !== room) return;
  room.preview = true;
  const first = !room.loaded;
  room.loaded = true;
  for (const m of Array.isArray(messages) ? messages : []) {
    if (typeof m?.id !== 'number' || room.offsets.has(m.id)) continue;
    addMessage(room, { offset: m.id, user: m.user, guest: m.guest, ts: m.ts }, typeof m.text === 'string' ? m.text : '');
  }
  if (room === chat.current) {
    renderEmpty();
    if (first) scrollToEnd();
  }
}

let roomsTimer = null;

/** Refreshes the room list a moment from now (presence changes come in bursts). */
function refreshRoomsSoon() {
  clearTimeout(roomsTimer);
  roomsTimer = setTimeout(refreshRooms, 1000);
}

// ---------------------------------------------------------------------------------------------
// Opening, showing and leaving rooms

function saveRooms() {
  try {
    localStorage.setItem(ROOMS_KEY, JSON.stringify([...chat.rooms.keys()]));
    if (chat.current) localStorage.setItem(ROOM_KEY, chat.current.name);
  } catch { /* storage disabled: this page only */ }
}

function storedRooms() {
  try {
    const rooms = JSON.parse(localStorage.getItem(ROOMS_KEY) ?? '[]');
    return Array.isArray(rooms) ? rooms.filter((r) => typeof r === 'string' && ROOM_RE.test(r)).slice(0, MAX_OPEN) : [];
  } catch {
    return [];
  }
}

function storedRoom() {
  try {
    const room = localStorage.getItem(ROOM_KEY);
    return room && ROOM_RE.test(room) ? room : null;
  } catch {
    return null;
  }
}

/** Opens `name` (subscribing when connected) unless it is open; returns its Room. */
function openRoom(name) {
  let room = chat.rooms.get(name);
  if (room) return room;
  if (chat.rooms.size >= MAX_OPEN) {
    // The oldest room not shown makes way: a page that follows many rooms stays light.
    const oldest = [...chat.rooms.values()].find((r) => r !== chat.current);
    if (oldest) leaveRoom(oldest, { quiet: true });
  }
  room = new Room(name);
  chat.rooms.set(name, room);
  if (conn.client && !chat.watching) subscribe(conn.client, room);
  saveRooms();
  return room;
}

/** Shows `room` in the conversation pane: no reconnect, the other rooms stay subscribed. */
function showRoom(room) {
  const previous = chat.current;
  if (previous && previous !== room) {
    previous.scroll = isNearBottom(ui.messages) ? null : ui.messages.scrollTop;
    previous.draft = ui.input.value;
    stopTyping(previous);
  }
  chat.current = room;
  if (room) room.unread = 0;
  ui.messages.replaceChildren(...(room?.items ?? []));
  ui.messages.setAttribute('aria-label', room ? `Messages in ${room.name}` : 'Messages');
  if (room && room.replaying > 0) ui.messages.setAttribute('aria-busy', 'true');
  else ui.messages.removeAttribute('aria-busy');
  ui.roomTitle.textContent = room ? `#${room.name}` : 'Chat';
  if (previous !== room) {
    ui.input.value = room?.draft ?? '';
    showComposerError('');
    autosize();
    renderCount();
  }
  if (room) {
    ui.roomInput.value = room.name;
    const hash = `#room=${encodeURIComponent(room.name)}`;
    if (location.hash !== hash) history.replaceState(null, '', hash);
  }
  saveRooms();
  renderOpenRooms();
  renderMembers();
  renderTyping();
  renderEmpty();
  renderComposer();
  for (const link of ui.rooms.querySelectorAll('.room-link')) {
    if (link.dataset.room === room?.name) link.setAttribute('aria-current', 'true');
    else link.removeAttribute('aria-current');
  }
  loadPreview(room);
  if (room?.scroll === null || room?.scroll === undefined) scrollToEnd();
  else ui.messages.scrollTop = room.scroll;
}

function leaveRoom(room, { quiet = false } = {}) {
  stopTyping(room);
  for (const timer of room.typing.values()) clearTimeout(timer);
  chat.rooms.delete(room.name);
  const sub = room.sub;
  room.sub = null;
  sub?.unsubscribe().catch(() => {}); // gone from the page either way
  if (room === chat.current) {
    const next = [...chat.rooms.values()].at(-1) ?? null;
    showRoom(next);
    if (!next) history.replaceState(null, '', location.pathname);
    if (!quiet) (next ? ui.input : ui.roomInput).focus();
  } else {
    renderOpenRooms();
  }
  saveRooms();
  if (!quiet) announce(`Left #${room.name}.`);
}

// ---------------------------------------------------------------------------------------------
// Who we are

function applyIdentity(identity) {
  const guest = identity.guest;
  ui.nickField.hidden = !guest || !identity.guests;
  ui.nick.required = guest && identity.guests;
  ui.guestsOff.hidden = !(guest && !identity.guests);
  ui.join.disabled = guest && !identity.guests;
}

/** Connects as whoever we are now, or says what is missing. */
function connectAsIdentity() {
  const identity = currentIdentity();
  applyIdentity(identity);
  ui.problem.textContent = '';
  for (const room of chat.rooms.values()) room.sub = null;
  const name = connectName(identity, chat.nick);
  chat.watching = name === null;
  chat.me = null;
  // Without a name the page still connects, without an identity: broadcasts reach it from the
  // first second, and the room shown is read over HTTP.
  conn.start(name ?? '', { watch: chat.watching });
  if (chat.watching) loadPreview(chat.current);
  renderMembers();
  renderEmpty();
  renderComposer();
}

// ---------------------------------------------------------------------------------------------
// The drawer (phones): rooms and people behind a button, the conversation first

const narrow = window.matchMedia('(max-width: 51.99rem)');

function drawerOpen() {
  return document.body.classList.contains('drawer-open');
}

function setDrawer(open, { focus = true } = {}) {
  const drawer = narrow.matches && open;
  document.body.classList.toggle('drawer-open', drawer);
  ui.drawerToggle.setAttribute('aria-expanded', String(drawer));
  ui.scrim.hidden = !drawer;
  // On a phone the drawer is modal while open and out of reach while closed.
  ui.sidebar.inert = narrow.matches && !drawer;
  ui.room.inert = drawer;
  for (const node of [document.querySelector('.site-header'), document.getElementById('notices')]) {
    if (node) node.inert = drawer;
  }
  if (drawer && focus) {
    const target = !ui.nickField.hidden && !NICK_RE.test(ui.nick.value.trim()) ? ui.nick
      : ui.openRooms.querySelector('[aria-current="true"]') ?? ui.roomInput;
    target.focus();
  } else if (!open && focus && narrow.matches) {
    ui.drawerToggle.focus();
  }
}

// ---------------------------------------------------------------------------------------------

function roomFromHash() {
  const room = hashParams().get('room');
  return room && ROOM_RE.test(room) ? room : null;
}

function wire() {
  ui.joinForm.addEventListener('submit', (event) => {
    event.preventDefault();
    ui.joinError.textContent = '';
    ui.nick.removeAttribute('aria-invalid');
    const name = ui.roomInput.value.trim() || 'lobby';
    if (!ROOM_RE.test(name) || /^\.+$/.test(name)) {
      ui.joinError.textContent = 'A room name has 1–64 letters, digits, “_”, “-” or “.”.';
      ui.roomInput.focus();
      return;
    }
    const identity = currentIdentity();
    let reconnect = !conn.client || conn.client.state === 'closed';
    if (identity.guest) {
      if (!identity.guests) {
        ui.joinError.textContent = 'Log in to chat: this server does not let guests in.';
        return;
      }
      const nick = ui.nick.value.trim();
      const problem = nickProblem(nick);
      if (problem) {
        ui.joinError.textContent = problem;
        ui.nick.setAttribute('aria-invalid', 'true');
        ui.nick.focus();
        return;
      }
      if (nick !== chat.nick) reconnect = true;
      chat.nick = nick;
      storeNick(nick);
    }
    showRoom(openRoom(name));
    if (reconnect) connectAsIdentity();
    setDrawer(false, { focus: false });
    ui.input.focus();
  });

  const followHash = () => {
    const name = roomFromHash();
    if (name && name !== chat.current?.name) {
      showRoom(openRoom(name));
      setDrawer(false, { focus: false });
    }
  };
  window.addEventListener('hashchange', followHash);
  window.addEventListener('popstate', followHash);

  ui.reconnect.addEventListener('click', () => {
    ui.problem.textContent = '';
    conn.reconnectNow();
  });
  const toJoinForm = () => {
    if (narrow.matches) setDrawer(true);
    else (ui.nickField.hidden ? ui.roomInput : ui.nick).focus();
  };
  ui.startJoin.addEventListener('click', toJoinForm);
  ui.joinBarButton.addEventListener('click', () => {
    if (missing() !== 'login') {
      toJoinForm();
      return;
    }
    const box = byId('login-box');
    box.open = true;
    byId('login-user').focus();
  });

  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.input.addEventListener('input', () => {
    autosize();
    renderCount();
    const room = chat.current;
    if (!room) return;
    room.draft = ui.input.value;
    if (ui.input.value.trim()) typingPulse(room);
    else stopTyping(room);
  });
  ui.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });

  ui.drawerToggle.addEventListener('click', () => setDrawer(!drawerOpen()));
  ui.drawerClose.addEventListener('click', () => setDrawer(false));
  ui.scrim.addEventListener('click', () => setDrawer(false));
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && drawerOpen()) {
      event.preventDefault();
      setDrawer(false);
    }
  });
  // Picking a room in the drawer shows it (the hash changes); the drawer has done its job.
  ui.sidebar.addEventListener('click', (event) => {
    if (event.target.closest('a.room-link') && narrow.matches) setDrawer(false, { focus: false });
  });
  narrow.addEventListener('change', () => setDrawer(false, { focus: false }));

  onIdentityChange(() => connectAsIdentity());
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && chat.current?.unread) {
      chat.current.unread = 0;
      renderOpenRooms();
    }
  });

  setInterval(() => {
    if (document.visibilityState !== 'visible') return;
    refreshRooms();
    loadPreview(chat.current);
  }, ROOMS_REFRESH_MS);
}

async function main() {
  wire();
  setDrawer(false, { focus: false });
  ui.nick.value = chat.nick;
  const first = roomFromHash() ?? storedRoom() ?? 'lobby';
  for (const name of storedRooms()) openRoom(name);
  showRoom(openRoom(first));
  refreshRooms();
  await initHeader();
  // Learning who we are may have connected already (an identity other than the one assumed).
  if (!conn.client) connectAsIdentity();
}

main();
