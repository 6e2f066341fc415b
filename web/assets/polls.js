// The polls page (GET /polls): list and create polls, open one (#poll=ID), vote, and watch the
// counts change live over /ws/polls/{id}.
import {
  ApiError, ConnStatus, LiveSocket, NICK_RE, announce, api, byId, currentIdentity, el,
  hashParams, initHeader, nickProblem, onIdentityChange, storeNick, storedNick, wsUrl,
} from './common.js';

const MAX_OPTIONS = 20;
const LIST_REFRESH_MS = 20000;

const ui = {
  title: byId('poll-title'),
  conn: byId('poll-conn-state'),
  reconnect: byId('reconnect-now'),
  placeholder: byId('poll-placeholder'),
  body: byId('poll-body'),
  nickForm: byId('nick-form'),
  nick: byId('nick'),
  votingAs: byId('voting-as'),
  votingAsName: byId('voting-as-name'),
  changeNick: byId('change-nick'),
  choices: byId('poll-choices'),
  total: byId('poll-total'),
  myVote: byId('poll-my-vote'),
  error: byId('poll-error'),
  form: byId('poll-form'),
  question: byId('poll-question'),
  options: byId('poll-options'),
  addOption: byId('add-option'),
  create: byId('poll-create'),
  formError: byId('poll-form-error'),
  list: byId('polls-list'),
  listEmpty: byId('polls-empty'),
  refresh: byId('polls-refresh'),
};

/** The open poll. */
const view = {
  id: null,           // the poll id from #poll=ID, as a string
  poll: null,         // the poll object
  vote: null,         // this user's vote (optimistic after a click)
  confirmedVote: null, // the vote the server last told us about
  nick: storedNick(),
  choices: new Map(), // option → { item, button, count, fill, pct }
};

const status = new ConnStatus(ui.conn);

const socket = new LiveSocket({
  url() {
    const name = currentIdentity().guest ? view.nick : undefined;
    return wsUrl(`/ws/polls/${encodeURIComponent(view.id)}`, { name });
  },
  onMessage: handleEvent,
  onClose: handleClose,
  onState(state, info) {
    status.set(state, info);
    document.body.dataset.conn = state;
    ui.reconnect.hidden = state !== 'reconnecting';
    for (const { button } of view.choices.values()) button.disabled = state !== 'live';
  },
});

// ---------------------------------------------------------------------------------------------
// Live events

function handleEvent(event) {
  switch (event.type) {
    case 'poll':
      if (!event.poll || String(event.poll.id) !== view.id) break;
      renderPoll(event.poll);
      view.vote = event.vote ?? null;
      view.confirmedVote = view.vote;
      renderVote();
      socket.markLive();
      ui.error.textContent = '';
      break;
    case 'counts':
      if (String(event.id) !== view.id || !view.poll) break;
      view.poll.counts = event.counts ?? {};
      view.poll.total = event.total ?? sum(view.poll.counts);
      renderCounts();
      updateListEntry(view.id, view.poll.total);
      break;
    case 'error':
      ui.error.textContent = `The server refused that: ${event.error ?? 'unknown error'}`;
      view.vote = view.confirmedVote;
      renderVote();
      break;
    default:
      break;
  }
}

function handleClose({ code, opened, failuresBeforeOpen }) {
  if (opened && code !== 1000 && code !== 1005 && code !== 1006) {
    ui.error.textContent = `Disconnected (code ${code}); reconnecting.`;
  }
  if (!opened && failuresBeforeOpen === 2) {
    ui.error.textContent = currentIdentity().guest
      ? `Cannot connect to this poll. The server may be down, or “${view.nick}” may be in use by another guest or a registered user's name (pick another, or log in).`
      : 'Cannot connect to this poll. The server may be down, or your session may have expired.';
  }
}

function sum(counts) {
  return Object.values(counts).reduce((a, b) => a + (Number(b) || 0), 0);
}

// ---------------------------------------------------------------------------------------------
// Rendering the open poll

function renderPoll(poll) {
  view.poll = { ...poll, counts: poll.counts ?? {}, options: Array.isArray(poll.options) ? poll.options : [] };
  ui.title.textContent = String(poll.question ?? `Poll ${poll.id}`);
  document.title = `${ui.title.textContent} · Polls · tether`;
  view.choices.clear();
  const live = socket.state === 'live';
  ui.choices.replaceChildren(...view.poll.options.map((option) => {
    const label = el('span', { class: 'choice-label', text: String(option) });
    const count = el('span', { class: 'choice-count', text: '0' });
    const pct = el('span', { class: 'choice-pct', text: '0%' });
    const fill = el('span', { class: 'choice-fill' });
    const button = el('button', {
      type: 'button',
      class: 'choice',
      dataset: { option: String(option) },
      'aria-pressed': 'false',
      disabled: !live,
      onclick: () => castVote(option),
    },
    el('span', { class: 'choice-top' }, label, el('span', { class: 'choice-numbers' }, count, ' ', el('span', { class: 'sr-only', text: 'votes, ' }), pct)),
    el('span', { class: 'choice-bar', 'aria-hidden': 'true' }, fill));
    const item = el('li', {}, button);
    view.choices.set(option, { item, button, count, fill, pct });
    return item;
  }));
  renderCounts();
  renderVote();
}

function renderCounts() {
  const counts = view.poll.counts;
  const total = Number(view.poll.total ?? sum(counts)) || 0;
  const top = Math.max(0, ...Object.values(counts).map(Number));
  for (const [option, parts] of view.choices) {
    const n = Number(counts[option] ?? 0);
    const share = total ? Math.round((n / total) * 100) : 0;
    parts.count.textContent = String(n);
    parts.button.dataset.count = String(n);
    parts.pct.textContent = `${share}%`;
    parts.fill.style.width = `${total ? (n / total) * 100 : 0}%`;
    parts.button.classList.toggle('leading', n > 0 && n === top);
  }
  ui.total.textContent = `${total} vote${total === 1 ? '' : 's'}`;
  ui.total.dataset.total = String(total);
}

function renderVote() {
  for (const [option, parts] of view.choices) {
    const chosen = option === view.vote;
    parts.button.setAttribute('aria-pressed', String(chosen));
    parts.button.classList.toggle('chosen', chosen);
  }
  ui.myVote.textContent = view.vote === null
    ? 'You have not voted yet: pick an option.'
    : `Your vote: ${view.vote}. Pick another option to change it.`;
  ui.myVote.dataset.vote = view.vote ?? '';
}

function castVote(option) {
  ui.error.textContent = '';
  if (!socket.send({ vote: option })) {
    ui.error.textContent = 'Not connected: the vote was not sent.';
    return;
  }
  view.vote = option;
  renderVote();
  announce(`Voted for ${option}.`);
}

// ---------------------------------------------------------------------------------------------
// Opening a poll

function pollFromHash() {
  const id = hashParams().get('poll');
  return id && /^[A-Za-z0-9_.-]{1,64}$/.test(id) ? id : null;
}

function canConnect() {
  return !currentIdentity().guest || NICK_RE.test(view.nick);
}

function renderIdentity() {
  const guest = currentIdentity().guest;
  const haveNick = NICK_RE.test(view.nick);
  ui.nickForm.hidden = !guest || haveNick;
  ui.votingAs.hidden = !guest || !haveNick;
  ui.votingAsName.textContent = view.nick;
  if (!ui.nick.value) ui.nick.value = view.nick;
}

async function openPoll(id) {
  if (id === view.id) return;
  socket.stop();
  Object.assign(view, { id, poll: null, vote: null, confirmedVote: null });
  view.choices.clear();
  ui.choices.replaceChildren();
  ui.error.textContent = '';
  ui.total.textContent = '';
  ui.myVote.textContent = '';
  markOpenInList();
  if (id === null) {
    ui.title.textContent = 'Polls';
    document.title = 'Polls · tether';
    ui.placeholder.hidden = false;
    ui.body.hidden = true;
    ui.conn.hidden = true;
    return;
  }
  ui.placeholder.hidden = true;
  ui.body.hidden = false;
  ui.conn.hidden = false;
  ui.title.textContent = `Poll ${id}`;
  try {
    const poll = await api(`/api/polls/${encodeURIComponent(id)}`);
    if (view.id !== id) return; // another poll was opened meanwhile
    renderPoll(poll);
  } catch (err) {
    if (view.id !== id) return;
    if (err instanceof ApiError && err.status === 404) {
      ui.title.textContent = 'No such poll';
      ui.error.textContent = `There is no poll ${id}.`;
      socket.stop({ label: 'Not connected' });
      ui.nickForm.hidden = true;
      ui.votingAs.hidden = true;
      return;
    }
    ui.error.textContent = `Cannot load the poll: ${err.message}`;
  }
  connect();
}

function connect() {
  renderIdentity();
  if (view.id === null) return;
  if (!canConnect()) {
    socket.stop({ label: 'Choose a nickname to vote' });
    return;
  }
  socket.start();
}

// ---------------------------------------------------------------------------------------------
// The list and the create form

let listRequest = 0;

async function refreshList() {
  // Requests may overlap (page load, a poll just created, the timer): only the newest answer
  // is shown, so a slow older one never hides a poll that was just created.
  const request = ++listRequest;
  let polls;
  try {
    polls = await api('/api/polls');
    if (request !== listRequest) return;
  } catch (err) {
    if (request !== listRequest) return;
    ui.listEmpty.textContent = `Cannot load the polls: ${err.message}`;
    ui.listEmpty.hidden = false;
    return;
  }
  if (!Array.isArray(polls)) polls = [];
  ui.list.replaceChildren(...polls.map((poll) => {
    const total = Number(poll.total ?? 0);
    return el('li', { dataset: { pollId: String(poll.id) } },
      el('a', { href: `#poll=${encodeURIComponent(poll.id)}`, class: 'poll-link', dataset: { pollId: String(poll.id) } },
        el('span', { class: 'poll-question', text: String(poll.question ?? '') }),
        el('span', { class: 'poll-meta', text: `${total} vote${total === 1 ? '' : 's'}` })));
  }));
  ui.listEmpty.textContent = 'No polls yet.';
  ui.listEmpty.hidden = polls.length > 0;
  markOpenInList();
}

function updateListEntry(id, total) {
  const meta = ui.list.querySelector(`li[data-poll-id="${CSS.escape(id)}"] .poll-meta`);
  if (meta) meta.textContent = `${total} vote${total === 1 ? '' : 's'}`;
}

function markOpenInList() {
  for (const link of ui.list.querySelectorAll('.poll-link')) {
    if (link.dataset.pollId === view.id) link.setAttribute('aria-current', 'true');
    else link.removeAttribute('aria-current');
  }
}

let optionSerial = 0;

function addOptionRow(value = '') {
  optionSerial += 1;
  const id = `poll-option-${optionSerial}`;
  const input = el('input', { id, class: 'poll-option', name: 'option', maxlength: '100', autocomplete: 'off', value });
  const label = el('label', { for: id, class: 'sr-only' });
  const remove = el('button', { type: 'button', class: 'btn btn-quiet btn-small remove-option' , text: 'Remove' });
  const row = el('li', { class: 'option-row' }, label, input, remove);
  remove.addEventListener('click', () => {
    row.remove();
    renumberOptions();
    ui.options.querySelector('input')?.focus();
  });
  ui.options.append(row);
  renumberOptions();
  return input;
}

function renumberOptions() {
  const rows = [...ui.options.querySelectorAll('.option-row')];
  rows.forEach((row, i) => {
    row.querySelector('label').textContent = `Option ${i + 1}`;
    row.querySelector('input').placeholder = `Option ${i + 1}`;
    const remove = row.querySelector('.remove-option');
    remove.setAttribute('aria-label', `Remove option ${i + 1}`);
    remove.hidden = rows.length <= 2;
  });
  ui.addOption.disabled = rows.length >= MAX_OPTIONS;
}

function resetForm() {
  ui.question.value = '';
  ui.options.replaceChildren();
  addOptionRow();
  addOptionRow();
}

/** The poll the form describes, or a sentence saying what is wrong with it. */
function readForm() {
  const question = ui.question.value.trim();
  const options = [...ui.options.querySelectorAll('input')].map((i) => i.value.trim()).filter(Boolean);
  if (!question) return { problem: 'Write a question.', focus: ui.question };
  if (question.length > 200) return { problem: 'A question has at most 200 characters.', focus: ui.question };
  if (options.length < 2) return { problem: 'Give at least two options.', focus: ui.options.querySelector('input') };
  if (options.length > MAX_OPTIONS) return { problem: `A poll has at most ${MAX_OPTIONS} options.` };
  if (new Set(options).size !== options.length) return { problem: 'Each option must be different.' };
  if (options.some((o) => o.length > 100)) return { problem: 'An option has at most 100 characters.' };
  return { poll: { question, options } };
}

// ---------------------------------------------------------------------------------------------

function wire() {
  ui.form.addEventListener('submit', async (event) => {
    event.preventDefault();
    ui.formError.textContent = '';
    const { poll, problem, focus } = readForm();
    if (problem) {
      ui.formError.textContent = problem;
      focus?.focus();
      return;
    }
    ui.create.disabled = true;
    try {
      const created = await api('/api/polls', { method: 'POST', body: poll });
      resetForm();
      announce('Poll created.');
      await refreshList();
      location.hash = `poll=${encodeURIComponent(created.id)}`;
      ui.title.focus();
    } catch (err) {
      ui.formError.textContent = err.status === 401
        ? 'This server only lets logged-in users create polls: log in first.'
        : `Cannot create the poll: ${err.message}`;
    } finally {
      ui.create.disabled = false;
    }
  });
  ui.addOption.addEventListener('click', () => addOptionRow().focus());
  ui.refresh.addEventListener('click', refreshList);
  ui.reconnect.addEventListener('click', () => socket.reconnectNow());

  ui.nickForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const nick = ui.nick.value.trim();
    const problem = nickProblem(nick);
    if (problem) {
      ui.error.textContent = problem;
      ui.nick.focus();
      return;
    }
    ui.error.textContent = '';
    const changed = nick !== view.nick;
    view.nick = nick;
    storeNick(nick);
    if (changed || !socket.running) connect();
    else renderIdentity();
  });
  ui.changeNick.addEventListener('click', () => {
    ui.nickForm.hidden = false;
    ui.votingAs.hidden = true;
    ui.nick.focus();
    ui.nick.select();
  });

  window.addEventListener('hashchange', () => openPoll(pollFromHash()));
  onIdentityChange(() => {
    if (view.id !== null) connect();
    else renderIdentity();
  });
  setInterval(() => {
    if (document.visibilityState === 'visible') refreshList();
  }, LIST_REFRESH_MS);
}

async function main() {
  wire();
  resetForm();
  ui.nick.value = view.nick;
  await initHeader();
  renderIdentity();
  refreshList();
  openPoll(pollFromHash());
}

main();
