// The echo console (GET /console): open a WebSocket to any URL (by default this server's
// /ws/echo), send text or binary (as hex), and watch every frame and the socket's readyState.
// Besides that raw socket, the page follows the server's broadcasts like every page, through
// its own client on /ws.
import {
  Connection, byId, connectName, currentIdentity, describeClose, el, initHeader, onIdentityChange,
  storedNick, wsUrl,
} from './common.js';

const READY_STATES = ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED'];
const URL_KEY = 'tether.console.url';
const MAX_LOG = 500;
const MAX_TEXT_SHOWN = 4000;
const MAX_BYTES_SHOWN = 512;

const ui = {
  connectForm: byId('connect-form'),
  url: byId('ws-url'),
  connect: byId('connect'),
  disconnect: byId('disconnect'),
  closeCode: byId('close-code'),
  closeReason: byId('close-reason'),
  readyState: byId('ready-state'),
  extensions: byId('ws-extensions'),
  statsIn: byId('stats-in'),
  statsOut: byId('stats-out'),
  connectError: byId('connect-error'),
  textForm: byId('text-form'),
  textInput: byId('text-input'),
  sendText: byId('send-text'),
  binaryForm: byId('binary-form'),
  hexInput: byId('hex-input'),
  sendBinary: byId('send-binary'),
  hexError: byId('hex-error'),
  log: byId('frame-log'),
  logEmpty: byId('frame-log-empty'),
  clearLog: byId('clear-log'),
};

let ws = null;
let watcher = null;
const stats = { in: { n: 0, bytes: 0 }, out: { n: 0, bytes: 0 } };
const encoder = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// The socket

function defaultUrl() {
  return location.host ? wsUrl('/ws/echo') : 'ws://127.0.0.1:8080/ws/echo';
}

function connect() {
  ui.connectError.textContent = '';
  let url = ui.url.value.trim();
  if (/^https?:\/\//i.test(url)) url = url.replace(/^http/i, 'ws'); // http(s):// → ws(s)://
  if (!/^wss?:\/\//i.test(url)) {
    ui.connectError.textContent = 'The URL must start with ws:// or wss://.';
    ui.url.focus();
    return;
  }
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, 'reconnecting');
  let socket;
  try {
    socket = new WebSocket(url);
  } catch (err) {
    ui.connectError.textContent = `Cannot connect: ${err.message}`;
    return;
  }
  try { localStorage.setItem(URL_KEY, url); } catch { /* storage disabled */ }
  ws = socket;
  socket.binaryType = 'arraybuffer';
  ui.extensions.textContent = '—';
  addEntry('event', 'connecting', url);
  socket.onopen = () => {
    const parts = [];
    if (socket.extensions) parts.push(`extensions: ${socket.extensions}`);
    if (socket.protocol) parts.push(`protocol: ${socket.protocol}`);
    if (socket === ws) ui.extensions.textContent = socket.extensions || 'none';
    addEntry('event', 'open', parts.join('; ') || 'no extensions');
    showState();
  };
  socket.onmessage = (event) => {
    if (typeof event.data === 'string') {
      count('in', byteLength(event.data));
      addEntry('in', 'text', event.data, byteLength(event.data));
    } else {
      const bytes = new Uint8Array(event.data);
      count('in', bytes.length);
      addEntry('in', 'binary', hex(bytes), bytes.length);
    }
  };
  socket.onerror = () => {
    addEntry('event', 'error', 'The browser reported an error (it does not say which).');
  };
  socket.onclose = (event) => {
    const reason = event.reason ? ` “${event.reason}”` : '';
    addEntry('in', 'close', `${event.code}${reason}${event.wasClean ? '' : ' (not clean)'} — ${describeClose(event.code, event.reason)}`,
      undefined, { code: String(event.code) });
    showState();
  };
  watch();
}

function disconnect() {
  if (!ws || ws.readyState >= WebSocket.CLOSING) return;
  const code = Number(ui.closeCode.value || 1000);
  const reason = ui.closeReason.value;
  if (!(code === 1000 || (code >= 3000 && code <= 4999))) {
    ui.connectError.textContent = 'A browser may only close with code 1000 or 3000–4999.';
    ui.closeCode.focus();
    return;
  }
  if (byteLength(reason) > 123) {
    ui.connectError.textContent = 'A close reason has at most 123 bytes.';
    ui.closeReason.focus();
    return;
  }
  ui.connectError.textContent = '';
  ws.close(code, reason);
  addEntry('out', 'close', `${code}${reason ? ` “${reason}”` : ''}`, undefined, { code: String(code) });
  showState();
}

/** Shows readyState and enables the buttons; checked every 100 ms while a socket is not CLOSED. */
function showState() {
  const state = ws ? ws.readyState : null;
  const name = state === null ? 'NONE' : READY_STATES[state];
  ui.readyState.dataset.state = name;
  ui.readyState.value = state === null ? 'no socket' : `${name} (${state})`;
  document.body.dataset.readyState = name;
  const open = state === WebSocket.OPEN;
  ui.disconnect.disabled = !(state === WebSocket.CONNECTING || open);
  ui.sendText.disabled = !open;
  ui.sendBinary.disabled = !open;
  ui.connect.textContent = open || state === WebSocket.CONNECTING ? 'Reconnect' : 'Connect';
}

function watch() {
  clearInterval(watcher);
  showState();
  watcher = setInterval(() => {
    showState();
    if (!ws || ws.readyState === WebSocket.CLOSED) {
      clearInterval(watcher);
      watcher = null;
    }
  }, 100);
}

// ---------------------------------------------------------------------------------------------
// Sending

function sendText() {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  const text = ui.textInput.value;
  ws.send(text);
  count('out', byteLength(text));
  addEntry('out', 'text', text, byteLength(text));
}

/** Bytes from hex like "de ad be ef", "0xde,0xad", "de:ad"; null when it is not hex. */
export function parseHex(input) {
  const digits = input.replace(/0x/gi, '').replace(/[\s,:;-]/g, '');
  if (!/^[0-9a-f]*$/i.test(digits) || digits.length % 2) return null;
  const bytes = new Uint8Array(digits.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(digits.slice(i * 2, i * 2 + 2), 16);
  return bytes;
}

function sendBinary() {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  const bytes = parseHex(ui.hexInput.value);
  if (!bytes) {
    ui.hexError.textContent = 'Write pairs of hex digits, e.g. “de ad be ef”.';
    ui.hexInput.setAttribute('aria-invalid', 'true');
    ui.hexInput.focus();
    return;
  }
  ui.hexError.textContent = '';
  ui.hexInput.removeAttribute('aria-invalid');
  ws.send(bytes);
  count('out', bytes.length);
  addEntry('out', 'binary', hex(bytes), bytes.length);
}

// ---------------------------------------------------------------------------------------------
// The log

function byteLength(text) {
  return encoder.encode(text).length;
}

function hex(bytes) {
  const shown = Array.from(bytes.subarray(0, MAX_BYTES_SHOWN), (b) => b.toString(16).padStart(2, '0')).join(' ');
  return bytes.length > MAX_BYTES_SHOWN ? `${shown} … (${bytes.length - MAX_BYTES_SHOWN} more bytes)` : shown;
}

function formatSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function count(dir, bytes) {
  stats[dir].n += 1;
  stats[dir].bytes += bytes;
  const render = ({ n, bytes: b }) => `${n} message${n === 1 ? '' : 's'}, ${formatSize(b)}`;
  ui.statsIn.textContent = render(stats.in);
  ui.statsOut.textContent = render(stats.out);
}

const DIR_LABEL = { in: '↓ in', out: '↑ out', event: '• event' };

function addEntry(dir, type, data, size, extra = {}) {
  const now = new Date();
  const stamp = `${now.toLocaleTimeString([], { hour12: false })}.${String(now.getMilliseconds()).padStart(3, '0')}`;
  const shown = data.length > MAX_TEXT_SHOWN ? `${data.slice(0, MAX_TEXT_SHOWN)} … (${data.length - MAX_TEXT_SHOWN} more characters)` : data;
  const item = el('li', { class: 'frame', dataset: { dir, type, ...(size === undefined ? {} : { size: String(size) }), ...extra } },
    el('time', { class: 'frame-time', datetime: now.toISOString(), text: stamp }),
    el('span', { class: 'frame-dir', text: DIR_LABEL[dir] }),
    el('span', { class: 'frame-type', text: type }),
    el('span', { class: 'frame-size', text: size === undefined ? '' : formatSize(size) }),
    el('span', { class: 'frame-data', text: shown }));
  const stick = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
  ui.log.append(item);
  while (ui.log.childElementCount > MAX_LOG) ui.log.firstElementChild.remove();
  ui.logEmpty.hidden = true;
  if (stick) ui.log.scrollTop = ui.log.scrollHeight;
}

// ---------------------------------------------------------------------------------------------

function enterSends(textarea, form) {
  textarea.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
}

function wire() {
  ui.connectForm.addEventListener('submit', (event) => {
    event.preventDefault();
    connect();
  });
  ui.disconnect.addEventListener('click', disconnect);
  ui.textForm.addEventListener('submit', (event) => {
    event.preventDefault();
    sendText();
  });
  ui.binaryForm.addEventListener('submit', (event) => {
    event.preventDefault();
    sendBinary();
  });
  enterSends(ui.textInput, ui.textForm);
  ui.clearLog.addEventListener('click', () => {
    ui.log.replaceChildren();
    ui.logEmpty.hidden = false;
  });
}

// ---------------------------------------------------------------------------------------------
// Broadcasts: shown as notices. Whoever the visitor is (a login, a guest's nickname from the
// chat or polls page, or nobody yet: the server lets anyone watch), the page follows them.

const broadcasts = new Connection();

function followBroadcasts() {
  broadcasts.start(connectName(currentIdentity(), storedNick()) ?? '');
}

async function main() {
  let saved = null;
  try { saved = localStorage.getItem(URL_KEY); } catch { /* storage disabled */ }
  ui.url.value = saved || defaultUrl();
  wire();
  showState();
  onIdentityChange(followBroadcasts);
  await initHeader();
  // Learning who we are may have connected already (an identity other than the one assumed).
  if (!broadcasts.client) followBroadcasts();
}

main();
