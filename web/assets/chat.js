// The chat page (GET /): pick a room, read its history, talk, see who is here. The socket comes
// back by itself after a loss and resumes with ?since=LAST_ID&epoch=EPOCH, so no message is lost
// or shown twice (ids are also deduplicated here, defensively). Should the server's history have
// been reset (a new epoch), it says the resume was not recovered and the list starts afresh.
import {
  ApiError, ConnStatus, LiveSocket, NICK_RE, ROOM_RE, announce, api, byId, currentIdentity,
  describeClose, el, hashParams, initHeader, isNearBottom, nickProblem, onIdentityChange,
  refreshIdentity, storeNick, storedNick, timeElement, wsUrl,
} from './common.js';

const ROOM_KEY = 'tether.room';
const ROOMS_REFRESH_MS = 15000;

const ui = {
  joinForm: byId('join-form'),
  roomInput: byId('room-input'),
  roomSuggestions: byId('room-suggestions'),
  nickField: byId('nick-field'),
  nick: byId('nick'),
  joinError: byId('join-error'),
  rooms: byId('rooms'),
  roomsEmpty: byId('rooms-empty'),
  members: byId('members'),
  memberCount: byId('member-count'),
  roomTitle: byId('room-title'),
  conn: byId('conn-state'),
  reconnect: byId('reconnect-now'),
  messages: byId('messages'),
  empty: byId('messages-empty'),
  composer: byId('composer'),
  input: byId('message-input'),
  send: byId('send'),
};

/** What this page knows about the room it is in. */
const chat = {
  room: null,            // the room joined (or waiting for a nickname), null before
  nick: storedNick(),    // the guest nickname
  me: null,              // our name in the room, from the welcome
  seen: new Set(),       // ids of the messages shown
  maxId: 0,              // the highest id shown
  readyId: null,         // last_id of the latest `ready`
  epoch: null,           // the room's epoch: the stream our ids belong to
  members: new Set(),
  catchingUp: false,     // between `welcome` and `ready`
  caughtUp: 0,           // new messages received while catching up
  resuming: false,       // this connection asked for ?since=
};

const status = new ConnStatus(ui.conn);

const socket = new LiveSocket({
  url() {
    const since = resumePoint();
    chat.resuming = since !== undefined;
    const name = currentIdentity().guest ? chat.nick : undefined;
    const epoch = since === undefined ? undefined : chat.epoch;
    return wsUrl(`/ws/rooms/${encodeURIComponent(chat.room)}`, { name, since, epoch });
  },
  onMessage: handleEvent,
  onClose: handleClose,
  onState: handleState,
});

/** Where to resume: the last id seen (or announced by `ready`), or undefined for a fresh join. */
function resumePoint() {
  if (chat.readyId === null && chat.maxId === 0) return undefined;
  return Math.max(chat.readyId ?? 0, chat.maxId);
}

// ---------------------------------------------------------------------------------------------
// Events from the server

function handleEvent(event) {
  switch (event.type) {
    case 'welcome':
      chat.me = event.user ?? null;
      chat.members = new Set(Array.isArray(event.members) ? event.members : []);
      chat.catchingUp = true;
      chat.caughtUp = 0;
      ui.messages.setAttribute('aria-busy', 'true');
      renderMembers();
      markOwnMessages();
      if (event.truncated) {
        addNotice('Some messages were missed while you were away: the room no longer keeps them.', 'warn');
      } else if (event.recovered === false && chat.resuming) {
        // Our ids name other messages now: start the list again from what the server has.
        clearMessages();
        chat.resuming = false; // nothing was caught up on: the notice says what happened
        addNotice("The server's history of this room was reset; showing what it holds now.", 'warn');
      }
      if (typeof event.epoch === 'string') chat.epoch = event.epoch;
      break;
    case 'message':
      if (addMessage(event) && chat.catchingUp) chat.caughtUp += 1;
      break;
    case 'ready': {
      const firstLoad = chat.readyId === null;
      if (Number.isFinite(event.last_id)) chat.readyId = event.last_id;
      if (typeof event.epoch === 'string') chat.epoch = event.epoch;
      chat.catchingUp = false;
      ui.messages.removeAttribute('aria-busy');
      ui.empty.hidden = chat.seen.size > 0;
      socket.markLive();
      ui.joinError.textContent = '';
      if (chat.resuming) {
        const n = chat.caughtUp;
        addNotice(n ? `Reconnected — caught up on ${n} missed message${n === 1 ? '' : 's'}.` : 'Reconnected.', 'system');
      }
      if (firstLoad) scrollToEnd();
      refreshRooms();
      break;
    }
    case 'presence':
      if (event.room && event.room !== chat.room) break;
      if (event.event === 'join') chat.members.add(event.user);
      else if (event.event === 'leave') chat.members.delete(event.user);
      else break;
      renderMembers();
      refreshRoomsSoon();
      if (event.user !== chat.me) {
        addNotice(`${event.user} ${event.event === 'join' ? 'joined' : 'left'}.`, 'presence');
      }
      break;
    case 'broadcast':
      addNotice(event.text ?? '', 'broadcast', { from: event.user, ts: event.ts });
      break;
    case 'error':
      addNotice(`The server refused that: ${event.error ?? 'unknown error'}`, 'error');
      break;
    default:
      break; // a newer server may send more; ignore what we do not know
  }
}

function handleClose({ code, reason, opened, wasLive, failuresBeforeOpen }) {
  if (opened || wasLive) {
    if (code !== 1000 && code !== 1005) addNotice(describeClose(code, reason), code === 1006 ? 'warn' : 'error');
    return;
  }
  // The upgrade itself failed. A browser cannot see the HTTP status, so say what it could be.
  if (failuresBeforeOpen === 2) {
    const identity = currentIdentity();
    if (chat.readyId !== null && identity.guest) {
      ui.joinError.textContent = 'Cannot reach the server; still trying.';
    } else if (identity.guest) {
      ui.joinError.textContent = `Cannot join “${chat.room}”. The server may be down, or “${chat.nick}” may be `
        + "in use by another guest or a registered user's name (pick another, or log in).";
    } else {
      ui.joinError.textContent = `Cannot join “${chat.room}”. The server may be down, or your session may have expired.`;
    }
    // An expired session is a 401 at the upgrade: see whether we are still logged in.
    if (!identity.guest) refreshIdentity();
  }
}

function handleState(state, info) {
  status.set(state, info);
  document.body.dataset.conn = state;
  const live = state === 'live';
  ui.send.disabled = !live;
  ui.input.placeholder = live ? `Message #${chat.room}` : 'Not connected — keep typing, send once live';
  ui.reconnect.hidden = state !== 'reconnecting';
  // Who is here is only known while connected: stale while away, unknown once stopped.
  ui.members.classList.toggle('stale', !live);
  if (state === 'offline' && info.stopped && chat.members.size) {
    chat.members.clear();
    renderMembers();
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering

function addMessage(message) {
  const id = Number(message.id);
  if (!Number.isFinite(id)) return false;
  if (chat.seen.has(id)) return false;
  chat.seen.add(id);
  const stick = isNearBottom(ui.messages);
  const mine = chat.me !== null && message.user === chat.me;
  const item = el('li', {
    class: mine ? 'msg mine' : 'msg',
    dataset: { id: String(id), user: String(message.user ?? ''), mine: String(mine) },
  },
  el('div', { class: 'msg-meta' },
    el('span', { class: 'msg-user', text: String(message.user ?? '?') }),
    el('span', { class: 'you-tag', text: ' (you)' }),
    ' ',
    timeElement(message.ts)),
  el('p', { class: 'msg-text', text: String(message.text ?? '') }));

  // Ids arrive in order; should one ever not, put it where it belongs.
  if (id > chat.maxId) {
    ui.messages.append(item);
  } else {
    let before = null;
    for (const node of ui.messages.querySelectorAll('.msg')) {
      if (Number(node.dataset.id) > id) { before = node; break; }
    }
    ui.messages.insertBefore(item, before);
  }
  chat.maxId = Math.max(chat.maxId, id);
  ui.empty.hidden = true;
  if (stick || mine) scrollToEnd();
  return true;
}

/** Forgets every message shown (the notices stay). */
function clearMessages() {
  for (const node of ui.messages.querySelectorAll('.msg')) node.remove();
  chat.seen.clear();
  chat.maxId = 0;
  chat.caughtUp = 0;
}

/** A line in the log that is not a message: presence, broadcast, error, connection news. */
function addNotice(text, kind, { from, ts } = {}) {
  const stick = isNearBottom(ui.messages);
  const item = el('li', { class: `notice notice-${kind}`, dataset: { kind } });
  if (kind === 'broadcast') {
    item.append(
      el('div', { class: 'msg-meta' },
        el('span', { class: 'notice-label', text: `Broadcast${from ? ` from ${from}` : ''}` }), ' ', timeElement(ts)),
      el('p', { class: 'msg-text', text }),
    );
  } else {
    item.append(el('span', { text }));
  }
  ui.messages.append(item);
  ui.empty.hidden = true;
  if (stick) scrollToEnd();
}

function markOwnMessages() {
  for (const node of ui.messages.querySelectorAll('.msg')) {
    const mine = chat.me !== null && node.dataset.user === chat.me;
    node.classList.toggle('mine', mine);
    node.dataset.mine = String(mine);
  }
}

function renderMembers() {
  const names = [...chat.members].sort((a, b) => a.localeCompare(b));
  ui.members.replaceChildren(...names.map((name) => el('li', {
    class: name === chat.me ? 'member me' : 'member',
    dataset: { user: name },
  },
  el('span', { class: 'avatar', 'aria-hidden': 'true', text: name.slice(0, 1).toUpperCase() }),
  el('span', { class: 'member-name', text: name }),
  name === chat.me ? el('span', { class: 'you-tag', text: ' (you)' }) : null)));
  ui.memberCount.textContent = String(names.length);
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

let roomsRequest = 0;

async function refreshRooms() {
  // Several requests may overlap (page load, `ready`, presence): only the newest answer is
  // shown, so a slow older one never puts back a stale list.
  const request = ++roomsRequest;
  let rooms;
  try {
    rooms = await api('/api/rooms');
    if (request !== roomsRequest) return;
  } catch (err) {
    if (request !== roomsRequest) return;
    ui.roomsEmpty.textContent = err instanceof ApiError && err.status ? `Rooms: ${err.message}` : 'Cannot load the rooms.';
    ui.roomsEmpty.hidden = false;
    return;
  }
  if (!Array.isArray(rooms)) rooms = [];
  rooms.sort((a, b) => (b.members ?? 0) - (a.members ?? 0) || String(a.room).localeCompare(String(b.room)));
  ui.rooms.replaceChildren(...rooms.map((r) => {
    const members = Number(r.members ?? 0);
    const link = el('a', {
      class: 'room-link',
      href: `#room=${encodeURIComponent(r.room)}`,
      dataset: { room: r.room },
      'aria-current': r.room === chat.room ? 'true' : null,
    },
    el('span', { class: 'room-name', text: `#${r.room}` }),
    el('span', { class: 'badge', title: `${members} here`, text: String(members) }),
    el('span', { class: 'sr-only', text: ` (${members} here)` }));
    return el('li', {}, link);
  }));
  ui.roomSuggestions.replaceChildren(...rooms.map((r) => el('option', { value: r.room })));
  ui.roomsEmpty.textContent = 'No active rooms yet.';
  ui.roomsEmpty.hidden = rooms.length > 0;
}

let roomsTimer = null;

/** Refreshes the room list a moment from now (presence events come in bursts). */
function refreshRoomsSoon() {
  clearTimeout(roomsTimer);
  roomsTimer = setTimeout(refreshRooms, 1000);
}

function markCurrentRoom() {
  for (const link of ui.rooms.querySelectorAll('.room-link')) {
    if (link.dataset.room === chat.room) link.setAttribute('aria-current', 'true');
    else link.removeAttribute('aria-current');
  }
}

// ---------------------------------------------------------------------------------------------
// Joining

function roomFromHash() {
  const room = hashParams().get('room');
  return room && ROOM_RE.test(room) ? room : null;
}

function storedRoom() {
  try {
    const room = localStorage.getItem(ROOM_KEY);
    return room && ROOM_RE.test(room) ? room : null;
  } catch {
    return null;
  }
}

function canConnect() {
  return !currentIdentity().guest || NICK_RE.test(chat.nick);
}

/** Enters `room`: a fresh log for a new room; (re)connects when we know who we are. */
function enterRoom(room, { reconnect = false } = {}) {
  if (room !== chat.room) {
    socket.stop();
    Object.assign(chat, {
      room, me: null, seen: new Set(), maxId: 0, readyId: null, epoch: null, members: new Set(),
      catchingUp: false, caughtUp: 0, resuming: false,
    });
    ui.messages.replaceChildren();
    ui.empty.hidden = true;
    renderMembers();
    ui.roomTitle.textContent = `#${room}`;
    ui.messages.setAttribute('aria-label', `Messages in ${room}`);
    document.title = `#${room} · Chat · tether`;
    ui.roomInput.value = room;
    try { localStorage.setItem(ROOM_KEY, room); } catch { /* storage disabled */ }
    markCurrentRoom();
    reconnect = true;
  }
  if (`#${hashParams()}` !== `#room=${encodeURIComponent(room)}`) {
    history.replaceState(null, '', `#room=${encodeURIComponent(room)}`);
  }
  ui.joinError.textContent = '';
  if (!canConnect()) {
    socket.stop({ label: 'Choose a nickname to join' });
    return;
  }
  if (reconnect || !socket.running) socket.start();
}

function applyIdentity(identity) {
  ui.nickField.hidden = !identity.guest;
  ui.nick.required = identity.guest;
}

function wire() {
  ui.joinForm.addEventListener('submit', (event) => {
    event.preventDefault();
    ui.joinError.textContent = '';
    const room = ui.roomInput.value.trim() || 'lobby';
    if (!ROOM_RE.test(room)) {
      ui.joinError.textContent = 'A room name has 1–64 letters, digits, “_”, “-” or “.”.';
      ui.roomInput.focus();
      return;
    }
    let nickChanged = false;
    if (currentIdentity().guest) {
      const nick = ui.nick.value.trim();
      const problem = nickProblem(nick);
      if (problem) {
        ui.joinError.textContent = problem;
        ui.nick.focus();
        return;
      }
      nickChanged = nick !== chat.nick;
      chat.nick = nick;
      storeNick(nick);
    }
    if (room !== chat.room) history.pushState(null, '', `#room=${encodeURIComponent(room)}`);
    enterRoom(room, { reconnect: nickChanged });
    ui.input.focus();
  });

  const followHash = () => {
    const room = roomFromHash();
    if (room && room !== chat.room) enterRoom(room);
  };
  window.addEventListener('hashchange', followHash);
  window.addEventListener('popstate', followHash);

  ui.reconnect.addEventListener('click', () => socket.reconnectNow());

  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.input.addEventListener('input', autosize);
  ui.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim()) return;
    if (socket.send({ text })) {
      ui.input.value = '';
      autosize();
    } else {
      announce('Not connected: the message was not sent.');
    }
  });

  onIdentityChange((identity) => {
    applyIdentity(identity);
    if (chat.room) enterRoom(chat.room, { reconnect: true });
  });

  setInterval(() => {
    if (document.visibilityState === 'visible') refreshRooms();
  }, ROOMS_REFRESH_MS);
}

function autosize() {
  ui.input.style.height = 'auto';
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 160)}px`;
}

async function main() {
  wire();
  ui.nick.value = chat.nick;
  const identity = await initHeader();
  applyIdentity(identity);
  const room = roomFromHash() ?? storedRoom() ?? 'lobby';
  ui.roomInput.value = room;
  enterRoom(room);
  refreshRooms();
}

main();
