// The polls page (GET /polls): the list of polls, live from the `polls` channel (its subscribe
// reply is the list, then a publication for each poll created), create one, open one
// (#poll=ID) through its `poll:ID` channel (the state on subscribe, counts as publications)
// and vote by publishing to it. All on the page's one connection to /ws.
import {
  ApiError, Connection, ConnStatus, NICK_RE, announce, api, byId, connectName, currentIdentity,
  describeRefusal, el, hashParams, initHeader, nickProblem, onIdentityChange, refreshIdentity,
  storeNick, storedNick,
} from './common.js';

const MAX_OPTIONS = 20;
/** How often the list is fetched over HTTP while it cannot come live (no connection yet). */
const LIST_REFRESH_MS = 20000;

const ui = {
  title: byId('poll-title'),
  conn: byId('poll-conn-state'),
  reconnect: byId('reconnect-now'),
  problem: byId('conn-problem'),
  placeholder: byId('poll-placeholder'),
  body: byId('poll-body'),
  nickForm: byId('nick-form'),
  nick: byId('nick'),
  loginToVote: byId('login-to-vote'),
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
  listLive: byId('polls-live'),
  refresh: byId('polls-refresh'),
};

/** The open poll. */
const view = {
  id: null,            // the poll id from #poll=ID, as a string
  poll: null,          // the poll object
  vote: null,          // this user's vote (optimistic after a click)
  confirmedVote: null, // the vote the server last told us about
  canVote: true,       // the subscribe reply's can_vote
  sub: null,           // its poll:ID subscription
  subscribed: false,   // the subscription's state has arrived
  missing: false,      // the server has no such poll
  nick: storedNick(),
  choices: new Map(),  // option → { item, button, count, fill, pct }
};

/** The list: newest first, as GET /api/polls and the `polls` channel give it. */
const list = {
  polls: [],
  live: false,         // kept up to date by the `polls` channel
};

const status = new ConnStatus(ui.conn);
const conn = new Connection({ onClient, onState: renderState, onRefused });

// ---------------------------------------------------------------------------------------------
// The connection

function onClient(client) {
  list.live = false;
  client.subscribe('polls', {
    onSubscribed: (reply) => {
      if (Array.isArray(reply.polls)) {
        list.polls = reply.polls.slice();
        list.live = true;
        renderList();
      }
    },
    onPublication: ({ data }) => {
      if (data?.created && typeof data.created === 'object') {
        addToList(data.created);
        if (String(data.created.id) !== view.id) announce(`New poll: ${data.created.question}`);
      }
      if (data?.closed !== undefined) markClosed(String(data.closed));
    },
    // A server without the channel: the list comes over HTTP, refreshed now and then.
    onError: () => {
      list.live = false;
      renderList();
    },
  });
  if (view.id !== null) subscribePoll(client, view.id);
}

function subscribePoll(client, id) {
  view.subscribed = false;
  const sub = client.subscribe(`poll:${id}`, {
    // Once unsubscribed (the poll left, even with the reply on its way), tether-client runs
    // none of these again.
    onSubscribed: (reply) => {
      view.subscribed = true;
      if (reply.poll) renderPoll(reply.poll);
      view.vote = reply.vote ?? null;
      view.confirmedVote = view.vote;
      view.canVote = reply.can_vote !== false;
      ui.error.textContent = '';
      renderVote();
      renderIdentity();
      renderState();
    },
    onPublication: ({ data }) => {
      if (view.sub !== sub || !view.poll || !data?.counts) return;
      view.poll.counts = data.counts;
      view.poll.total = data.total ?? sum(data.counts);
      renderCounts();
      updateListEntry(view.id, view.poll.total);
    },
    onError: (error) => {
      if (view.sub !== sub) return;
      view.sub = null;
      if (error.code === 102) showMissing(id);
      else ui.error.textContent = `Cannot follow this poll: ${error.message}`;
      renderState();
    },
  });
  view.sub = sub;
}

function leavePoll() {
  const sub = view.sub;
  view.sub = null;
  view.subscribed = false;
  sub?.unsubscribe().catch(() => {}); // gone from the page either way
}

/** The badge: live once connected and, with a poll open, once its state is in. */
function renderState() {
  const { state, info } = conn;
  const waiting = state === 'live' && view.id !== null && !view.missing && !view.subscribed;
  status.set(waiting ? 'connecting' : state, info);
  document.body.dataset.conn = state;
  ui.reconnect.hidden = state !== 'reconnecting';
  ui.listLive.hidden = !(list.live && state === 'live');
  ui.refresh.hidden = list.live && state === 'live';
  renderChoicesEnabled();
}

async function onRefused(error) {
  ui.problem.textContent = describeRefusal(error.code, error.message, view.nick);
  if (error.code === 4503) {
    conn.label('Nickname refused');
    ui.nickForm.hidden = false;
    ui.votingAs.hidden = true;
    ui.nick.setAttribute('aria-invalid', 'true');
  } else if ([4501, 4502, 4504, 1008].includes(error.code)) {
    conn.label('Not logged in');
    await refreshIdentity();
  } else {
    ui.reconnect.hidden = false;
  }
}

/**
 * Connects as whoever we are now. Without a name to vote with, the page connects without an
 * identity: the server lets such a visitor watch (the live list, counts, broadcasts), and the
 * poll's panel says how to vote.
 */
function connectAsIdentity() {
  ui.problem.textContent = '';
  view.sub = null;
  view.subscribed = false;
  conn.start(connectName(currentIdentity(), view.nick) ?? '');
  renderIdentity();
  renderList();
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
  ui.choices.replaceChildren(...view.poll.options.map((option) => {
    const label = el('span', { class: 'choice-label', text: String(option) });
    const count = el('span', { class: 'choice-count', text: '0' });
    const pct = el('span', { class: 'choice-pct', text: '0%' });
    const fill = el('span', { class: 'choice-fill' });
    const unit = el('span', { class: 'sr-only', text: 'votes, ' });
    const button = el('button', {
      type: 'button',
      class: 'choice',
      dataset: { option: String(option) },
      'aria-pressed': 'false',
      disabled: true,
      onclick: () => castVote(option),
    },
    el('span', { class: 'choice-top' }, label, el('span', { class: 'choice-numbers' }, count, ' ', unit, pct)),
    el('span', { class: 'choice-bar', 'aria-hidden': 'true' }, fill));
    const item = el('li', {}, button);
    view.choices.set(option, { item, button, count, unit, fill, pct });
    return item;
  }));
  renderCounts();
  renderVote();
  renderChoicesEnabled();
}

function renderChoicesEnabled() {
  const usable = conn.state === 'live' && view.subscribed && view.canVote && !view.poll?.closed;
  for (const { button } of view.choices.values()) button.disabled = !usable;
}

function renderCounts() {
  const counts = view.poll.counts;
  const total = Number(view.poll.total ?? sum(counts)) || 0;
  const top = Math.max(0, ...Object.values(counts).map(Number));
  for (const [option, parts] of view.choices) {
    const n = Number(counts[option] ?? 0);
    const share = total ? Math.round((n / total) * 100) : 0;
    parts.count.textContent = String(n);
    parts.unit.textContent = n === 1 ? 'vote, ' : 'votes, ';
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
  if (view.poll?.closed) ui.myVote.textContent = 'This poll is closed.';
  else if (!view.subscribed) ui.myVote.textContent = '';
  else if (!view.canVote) ui.myVote.textContent = cannotVote();
  else if (view.vote === null) ui.myVote.textContent = 'You have not voted yet: pick an option.';
  else ui.myVote.textContent = `Your vote: ${view.vote}. Pick another option to change it.`;
  ui.myVote.dataset.vote = view.vote ?? '';
}

/**
 * Why this visitor's connection may not vote. A guest watching has no name yet (the server
 * counts a vote per user or per named guest): the nickname form, or the line asking to log in,
 * says what to do above the options, and nothing here contradicts it.
 */
function cannotVote() {
  return currentIdentity().guest ? '' : 'This connection may not vote: reload the page.';
}

async function castVote(option) {
  ui.error.textContent = '';
  const sub = view.sub;
  if (!sub || !view.subscribed) {
    ui.error.textContent = 'Not connected: the vote was not sent.';
    return;
  }
  view.vote = option;
  renderVote();
  try {
    await sub.publish({ vote: option }); // resolves once counted
    if (view.sub !== sub) return;
    view.confirmedVote = option;
    announce(`Voted for ${option}.`);
  } catch (err) {
    if (view.sub !== sub) return;
    view.vote = view.confirmedVote;
    renderVote();
    ui.error.textContent = `Your vote was not counted: ${err.message}.`;
  }
}

function showMissing(id) {
  view.missing = true;
  ui.title.textContent = 'No such poll';
  ui.error.textContent = `There is no poll ${id}.`;
  ui.choices.replaceChildren();
  view.choices.clear();
  ui.total.textContent = '';
  ui.myVote.textContent = '';
  ui.nickForm.hidden = true;
  ui.votingAs.hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Opening a poll

function pollFromHash() {
  const id = hashParams().get('poll');
  return id && /^[0-9]{1,18}$/.test(id) ? id : null;
}

function renderIdentity() {
  const identity = currentIdentity();
  const guest = identity.guest;
  const haveNick = NICK_RE.test(view.nick);
  const show = view.id !== null && !view.missing;
  ui.nickForm.hidden = !show || !guest || !identity.guests || haveNick;
  ui.votingAs.hidden = !show || !guest || !identity.guests || !haveNick;
  ui.votingAsName.textContent = view.nick;
  ui.loginToVote.hidden = !show || !guest || identity.guests;
  ui.loginToVote.textContent = 'This server lets only logged-in users vote: log in at the top of the page.';
  if (!ui.nick.value) ui.nick.value = view.nick;
}

async function openPoll(id) {
  if (id === view.id) return;
  leavePoll();
  Object.assign(view, { id, poll: null, vote: null, confirmedVote: null, canVote: true, missing: false });
  view.choices.clear();
  ui.choices.replaceChildren();
  ui.error.textContent = '';
  ui.total.textContent = '';
  ui.myVote.textContent = '';
  markOpenInList();
  renderIdentity();
  if (id === null) {
    ui.title.textContent = 'Polls';
    document.title = 'Polls · tether';
    ui.placeholder.hidden = false;
    ui.body.hidden = true;
    renderState();
    return;
  }
  ui.placeholder.hidden = true;
  ui.body.hidden = false;
  ui.title.textContent = `Poll ${id}`;
  if (conn.client) subscribePoll(conn.client, id);
  renderState();
  // Shown at once over HTTP, for visitors who cannot connect too (no nickname yet); the
  // subscription's state replaces it when it comes.
  try {
    const poll = await api(`/api/polls/${encodeURIComponent(id)}`);
    if (view.id !== id || view.subscribed) return;
    renderPoll(poll);
  } catch (err) {
    if (view.id !== id) return;
    if (err instanceof ApiError && err.status === 404) {
      leavePoll();
      showMissing(id);
      renderState();
      return;
    }
    if (!view.subscribed) ui.error.textContent = `Cannot load the poll: ${err.message}`;
  }
}

// ---------------------------------------------------------------------------------------------
// The list and the create form

let listRequest = 0;

/** GET /api/polls: the first paint, and the list while it cannot come live. */
async function refreshList() {
  const request = ++listRequest;
  let polls;
  try {
    polls = await api('/api/polls');
  } catch (err) {
    if (request !== listRequest || list.live) return;
    ui.listEmpty.textContent = `Cannot load the polls: ${err.message}`;
    ui.listEmpty.hidden = false;
    return;
  }
  // A newer answer, or the channel's list, wins over a slow older one.
  if (request !== listRequest || list.live) return;
  list.polls = Array.isArray(polls) ? polls : [];
  renderList();
}

/** A poll just created (by the channel, or by this page's form): on top, once. */
function addToList(poll) {
  if (poll?.id === undefined) return;
  list.polls = [poll, ...list.polls.filter((p) => String(p.id) !== String(poll.id))];
  renderList();
}

function markClosed(id) {
  const poll = list.polls.find((p) => String(p.id) === id);
  if (poll) poll.closed = true;
  if (view.id === id && view.poll) {
    view.poll.closed = true;
    renderVote();
    renderChoicesEnabled();
  }
  renderList();
}

function renderList() {
  ui.list.replaceChildren(...list.polls.map((poll) => {
    const total = Number(poll.total ?? 0);
    return el('li', { dataset: { pollId: String(poll.id) } },
      el('a', { href: `#poll=${encodeURIComponent(poll.id)}`, class: 'poll-link', dataset: { pollId: String(poll.id) } },
        el('span', { class: 'poll-question', text: String(poll.question ?? '') }),
        el('span', { class: 'poll-meta', text: `${poll.closed ? 'closed · ' : ''}${total} vote${total === 1 ? '' : 's'}` })));
  }));
  ui.listEmpty.textContent = 'No polls yet.';
  ui.listEmpty.hidden = list.polls.length > 0;
  ui.listLive.hidden = !(list.live && conn.state === 'live');
  ui.refresh.hidden = list.live && conn.state === 'live';
  markOpenInList();
}

function updateListEntry(id, total) {
  const poll = list.polls.find((p) => String(p.id) === id);
  if (poll) poll.total = total;
  const meta = ui.list.querySelector(`li[data-poll-id="${CSS.escape(id)}"] .poll-meta`);
  if (meta) meta.textContent = `${poll?.closed ? 'closed · ' : ''}${total} vote${total === 1 ? '' : 's'}`;
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
  const remove = el('button', { type: 'button', class: 'btn btn-quiet btn-small remove-option', text: 'Remove' });
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
      addToList(created); // the channel says so too; without a connection this is the news
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
  ui.reconnect.addEventListener('click', () => {
    ui.problem.textContent = '';
    conn.reconnectNow();
  });

  ui.nickForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const nick = ui.nick.value.trim();
    const problem = nickProblem(nick);
    if (problem) {
      ui.error.textContent = problem;
      ui.nick.setAttribute('aria-invalid', 'true');
      ui.nick.focus();
      return;
    }
    ui.error.textContent = '';
    ui.nick.removeAttribute('aria-invalid');
    const changed = nick !== view.nick;
    view.nick = nick;
    storeNick(nick);
    if (changed || !conn.client || conn.client.state === 'closed') connectAsIdentity();
    else renderIdentity();
  });
  ui.changeNick.addEventListener('click', () => {
    ui.nickForm.hidden = false;
    ui.votingAs.hidden = true;
    ui.nick.focus();
    ui.nick.select();
  });

  window.addEventListener('hashchange', () => openPoll(pollFromHash()));
  onIdentityChange(() => connectAsIdentity());
  setInterval(() => {
    if (document.visibilityState === 'visible' && !list.live) refreshList();
  }, LIST_REFRESH_MS);
}

async function main() {
  wire();
  resetForm();
  ui.nick.value = view.nick;
  refreshList();
  await initHeader();
  // Learning who we are may have connected already (an identity other than the one assumed).
  if (!conn.client) connectAsIdentity();
  openPoll(pollFromHash());
}

main();
