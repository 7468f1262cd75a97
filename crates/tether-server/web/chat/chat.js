// The chat page: the browser SDK plus a little DOM. Conversations (1:1 and groups)
// with unread counts, per-message state for what this device sent, the connection's
// state and the reason it last changed.

import { TetherClient } from '/sdk/tether.js';

const $ = (id) => document.getElementById(id);
const el = (tag, { dataset = {}, ...props } = {}, ...children) => {
  const e = Object.assign(document.createElement(tag), props);
  for (const [k, v] of Object.entries(dataset)) e.dataset[k] = v;
  e.append(...children);
  return e;
};

let client;
let open = '';
const unread = new Map();

function deviceId() {
  let id = localStorage.getItem('tether-chat-device');
  if (!id) {
    id = `web-${crypto.getRandomValues(new Uint32Array(2)).join('')}`;
    localStorage.setItem('tether-chat-device', id);
  }
  return id;
}

async function token(user, pasted) {
  if (pasted) return pasted;
  const res = await fetch('/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `dev login: HTTP ${res.status}`);
  return body.token;
}

$('login').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const user = form.get('user').trim();
  try {
    start(user, await token(user, form.get('token').trim()));
  } catch (e) {
    $('login-error').textContent = e.message;
  }
});

function start(user, tok) {
  $('login').hidden = true;
  $('app').hidden = false;
  $('me').textContent = user;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  client = new TetherClient({ url: `${scheme}://${location.host}/ws`, user, token: tok, device: deviceId() });
  window.client = client;
  client.addEventListener('state', () => {
    const conn = $('conn');
    conn.dataset.state = client.state;
    conn.textContent = client.reason ? `${client.state}: ${client.reason}` : client.state;
    if (client.state === 'online') loadConversations();
  });
  client.addEventListener('entry', ({ entry }) => {
    const mine = entry.from === user;
    if (entry.type === 'ENTRY_TYPE_MESSAGE' && !mine && entry.conversation !== open) {
      unread.set(entry.conversation, (unread.get(entry.conversation) || 0) + 1);
    } else if (entry.decoded.receipt && entry.decoded.receipt.by === user) {
      // Read on another device of ours.
      unread.set(entry.decoded.receipt.conversation, entry.decoded.receipt.unread);
    } else if (!unread.has(entry.conversation)) {
      unread.set(entry.conversation, 0);
    }
    if (entry.conversation === open && !mine && document.visibilityState === 'visible') client.markRead(entry);
    render();
  });
  client.addEventListener('sendstate', render);
  document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible') readOpen(); });
  client.start();
  render();
}

async function loadConversations() {
  const page = await client.conversations();
  if (!page) return;
  for (const c of page.conversations || []) unread.set(c.id, Number(c.unread || 0));
  render();
}

function readOpen() {
  const last = client.entries.filter((e) => e.conversation === open && e.type === 'ENTRY_TYPE_MESSAGE' && e.from !== client.user).at(-1);
  if (last) client.markRead(last);
  unread.set(open, 0);
}

function select(conversation) {
  open = conversation;
  if (!unread.has(open)) unread.set(open, 0);
  readOpen();
  $('composer').text.disabled = false;
  $('composer').querySelector('button').disabled = false;
  render();
}

$('new-chat').addEventListener('submit', (ev) => {
  ev.preventDefault();
  select(ev.target.to.value.trim());
  ev.target.reset();
});

$('new-group').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const group = ev.target.group.value.trim();
  const members = ev.target.members.value.split(',').map((m) => m.trim()).filter(Boolean);
  client.createGroup(group, members);
  select(`g:${group}`);
  ev.target.reset();
});

$('composer').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = ev.target.text.value;
  if (!text || !open) return;
  client.send(open, text);
  ev.target.reset();
});

function stateOf(entry) {
  const sent = Object.values(client.sends).find((s) => s.messageId === Number(entry.messageId));
  return sent ? sent.state : 'stored';
}

function render() {
  if (!client) return;
  const convs = $('conversations');
  convs.replaceChildren(...[...unread.keys()].sort().map((c) => el('button', {
    className: 'conv',
    type: 'button',
    ariaCurrent: String(c === open),
    dataset: { testid: `conv-${c}` },
    onclick: () => select(c),
  }, el('span', { textContent: c }), el('span', { className: 'badge', textContent: String(unread.get(c) || 0), dataset: { count: String(unread.get(c) || 0), testid: 'unread' } }))));

  const rows = [];
  const shown = new Set();
  for (const e of client.entries) {
    if (e.conversation !== open) continue;
    if (e.type === 'ENTRY_TYPE_MEMBERSHIP') {
      const g = e.decoded.group;
      rows.push(el('div', { className: 'msg event', textContent: `${g.actor} ${g.kind} ${g.members.join(', ')}` }));
    } else if (e.type === 'ENTRY_TYPE_MESSAGE') {
      const mine = e.from === client.user;
      const state = mine ? stateOf(e) : '';
      shown.add(Number(e.messageId));
      rows.push(el('div', { className: `msg${mine ? ' mine' : ''}`, dataset: { testid: 'msg', state } },
        el('div', { textContent: e.decoded.text }),
        el('div', { className: 'meta', textContent: `${mine ? '' : e.from + ' · '}${new Date(Number(e.tsMs)).toLocaleTimeString()}${state ? ' · ' + state : ''}`, dataset: { testid: 'msg-state' } })));
    }
  }
  // Sent from this device and not yet back as an entry of the inbox.
  for (const [id, s] of Object.entries(client.sends)) {
    if (s.to !== open || s.op || shown.has(s.messageId)) continue;
    rows.push(el('div', { className: 'msg mine', dataset: { testid: 'msg', state: s.state, id } },
      el('div', { textContent: s.body }),
      el('div', { className: 'meta', textContent: s.state, dataset: { testid: 'msg-state' } })));
  }
  $('messages').replaceChildren(...rows);
  $('messages').scrollTop = $('messages').scrollHeight;
}
