// Tether browser SDK: one ES module, no dependencies. It speaks the WebSocket JSON
// sub-protocol (`tether.v1.json`: one proto3-JSON Envelope per text message) with the
// Rust SDK's semantics (DESIGN §4, §6):
//
// - heartbeat in idle mode: a PING is due at last_tx + I; unanswered, re-PING every P;
//   the link is dead after m PINGs without an answer, each timed from when it was
//   actually sent (a hidden tab's timers fire about once a minute, so nothing is timed
//   from when a timer was meant to fire). A hidden tab asks for a longer interval
//   (PING{next}, switching when the PONG echoes it); a visible one shortens at once.
// - reconnect with capped exponential backoff and full jitter, never sooner than an
//   OVERLOADED error's retry_after_ms; GOAWAY's window is used as given. After a KICK
//   or a refused token the client stops and says why.
// - outbox: every send has a client message id fixed when it is made, kept in
//   storage with the send until its SEND_ACK, and resent in order after every
//   (re)connect; the server answers a resend with the original SEND_ACK.
// - inbox: entries are accepted in seq order exactly once; the position
//   (inbox_epoch, last_seq) and the entries are saved together, before the app sees
//   them and before the ACK, and the next login resumes from that position.
//
// Storage is `localStorage` unless another `{getItem, setItem}` is given.

const SUBPROTOCOL = 'tether.v1.json';
const LOG_LIMIT = 2000;

/** Connection states, as `client.state`. */
export const States = Object.freeze({
  IDLE: 'idle',
  CONNECTING: 'connecting',
  ONLINE: 'online',
  OFFLINE: 'offline',
  STOPPED: 'stopped',
});

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
const unhex = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));
const toB64 = (bytes) => btoa(String.fromCharCode(...bytes));
const fromB64 = (s) => Uint8Array.from(atob(s || ''), (c) => c.charCodeAt(0));
const utf8 = new TextEncoder();
const text = new TextDecoder();
const num = (v) => Number(v || 0);

/** A fresh 16-byte client message id, as hex. */
export function newMessageId() {
  return hex(crypto.getRandomValues(new Uint8Array(16)));
}

// The fields of a protobuf message (varints as Numbers, length-delimited as bytes):
// enough for the two bodies the SDK reads (ReceiptBody, GroupEvent).
function pbFields(bytes) {
  const out = new Map();
  let i = 0;
  const varint = () => {
    let v = 0;
    let scale = 1;
    for (;;) {
      const b = bytes[i++];
      v += (b & 0x7f) * scale;
      if (b < 0x80) return v;
      scale *= 128;
    }
  };
  while (i < bytes.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    let value;
    switch (key & 7) {
      case 0: value = varint(); break;
      case 2: { const n = varint(); value = bytes.subarray(i, i + n); i += n; break; }
      case 1: i += 8; continue;
      case 5: i += 4; continue;
      default: return out;
    }
    if (!out.has(field)) out.set(field, []);
    out.get(field).push(value);
  }
  return out;
}

/** Decodes an entry's body: a receipt or a group event, else the text. */
export function decodeBody(entry) {
  const bytes = fromB64(entry.body);
  const f = pbFields.bind(null, bytes);
  if (entry.type === 'ENTRY_TYPE_RECEIPT') {
    const m = f();
    const s = (n) => (m.get(n) ? text.decode(m.get(n)[0]) : '');
    const v = (n) => (m.get(n) ? m.get(n)[0] : 0);
    return {
      receipt: {
        kind: v(1) === 2 ? 'read' : 'delivered',
        conversation: s(2),
        by: s(3),
        upToMessageId: v(4),
        upToSeq: v(5),
        unread: v(6),
      },
    };
  }
  if (entry.type === 'ENTRY_TYPE_MEMBERSHIP') {
    const m = f();
    const s = (n) => (m.get(n) || []).map((b) => text.decode(b));
    const kinds = ['', 'created', 'added', 'removed', 'left'];
    return {
      group: {
        kind: kinds[(m.get(1) || [0])[0]] || 'unknown',
        group: s(2)[0] || '',
        actor: s(3)[0] || '',
        members: s(4),
        name: s(5)[0] || '',
        size: (m.get(7) || [0])[0],
      },
    };
  }
  return { text: text.decode(bytes) };
}

/**
 * One device of one user. Events (`addEventListener`):
 * - `state`: `{state, reason}` whenever the connection state changes;
 * - `entry`: `{entry}` for every inbox entry, once, in order (`entry.decoded` holds
 *   the text, receipt or group event);
 * - `sendstate`: `{id, state, ...}` when a send moves: sending, unconfirmed (the link
 *   dropped before its SEND_ACK; it will be resent), stored, delivered, read, failed.
 */
export class TetherClient extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.url       ws:// or wss:// URL of the server's `/ws`
   * @param {string} o.user      the user the token is for
   * @param {string} o.token     login token
   * @param {string} o.device    stable device id (e.g. one per browser profile)
   * @param {number} [o.heartbeatMs=30000]        interval while visible
   * @param {number} [o.hiddenHeartbeatMs=240000] interval while the tab is hidden
   * @param {number} [o.backoffBaseMs=500]
   * @param {number} [o.backoffCapMs=30000]
   * @param {number} [o.connectTimeoutMs=10000] no WELCOME this long after connecting: retry
   * @param {{getItem(k:string):string|null, setItem(k:string,v:string):void}} [o.storage]
   */
  constructor(o) {
    super();
    this.url = o.url;
    this.user = o.user;
    this.token = o.token;
    this.device = o.device;
    this.visibleMs = o.heartbeatMs ?? 30000;
    this.hiddenMs = o.hiddenHeartbeatMs ?? 240000;
    this.backoffBase = o.backoffBaseMs ?? 500;
    this.backoffCap = o.backoffCapMs ?? 30000;
    this.connectTimeout = o.connectTimeoutMs ?? 10000;
    this.storage = o.storage ?? globalThis.localStorage;
    this.key = `tether:${this.user}:${this.device}`;
    this.st = Object.assign(
      { inboxEpoch: 0, lastSeq: 0, deviceEpoch: 0, outbox: [], sent: {}, log: [] },
      JSON.parse(this.storage.getItem(this.key) || '{}'),
    );
    this.state = States.IDLE;
    this.reason = '';
    this.ws = null;
    this.attempt = 0;
    this.floorMs = 0;
    this.timer = null;
    this.reconnectTimer = null;
    this.queries = new Map();
    this.nextQuery = 1;
    this.duplicatesDropped = 0;
    this.interval = this.visibleMs;
    this.pendingInterval = 0;
    this.onVisibility = () => this.applyVisibility();
  }

  /** Entries received so far (saved with the position), oldest first. */
  get entries() { return this.st.log; }
  /** Sends and their states, by client message id. */
  get sends() { return this.st.sent; }

  save() { this.storage.setItem(this.key, JSON.stringify(this.st)); }

  setState(state, reason = '') {
    this.state = state;
    this.reason = reason;
    this.dispatchEvent(Object.assign(new Event('state'), { state, reason }));
  }

  /** Connects (and keeps reconnecting) until `stop()` or a KICK. */
  start() {
    if (typeof document !== 'undefined') document.addEventListener('visibilitychange', this.onVisibility);
    // A new login of this device must replace any older session of it.
    this.st.deviceEpoch += 1;
    this.save();
    this.connect();
  }

  /** Closes without reconnecting. */
  stop(reason = 'local close') {
    this.halt(reason);
  }

  halt(reason) {
    clearTimeout(this.timer);
    clearTimeout(this.reconnectTimer);
    if (typeof document !== 'undefined') document.removeEventListener('visibilitychange', this.onVisibility);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
    this.setState(States.STOPPED, reason);
  }

  connect() {
    this.setState(States.CONNECTING);
    const ws = new WebSocket(this.url, SUBPROTOCOL);
    this.ws = ws;
    // A SYN into a dead path is retried by the kernel for minutes: give up sooner.
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (this.ws === ws && this.state === States.CONNECTING) this.linkDown('no WELCOME within the connect timeout');
    }, this.connectTimeout);
    ws.onopen = () => {
      const hello = {
        version: 1,
        token: this.token,
        deviceId: this.device,
        deviceEpoch: String(this.st.deviceEpoch),
        platform: 'web',
        heartbeatMode: 'HEARTBEAT_MODE_IDLE',
        heartbeatIntervalMs: this.visible() ? this.visibleMs : this.hiddenMs,
      };
      if (this.st.inboxEpoch) {
        hello.resume = { inboxEpoch: String(this.st.inboxEpoch), lastSeq: String(this.st.lastSeq) };
      }
      this.write({ hello });
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      let env;
      try { env = JSON.parse(ev.data); } catch { return this.linkDown('protocol error: bad JSON from the server'); }
      this.lastRx = Date.now();
      this.misses = 0;
      this.pingSentAt = 0;
      this.onFrame(env);
    };
    ws.onclose = (ev) => {
      if (this.ws === ws) this.linkDown(`closed by the server (${ev.code}${ev.reason ? ': ' + ev.reason : ''})`);
    };
  }

  write(env) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(env));
    this.lastTx = Date.now();
    return true;
  }

  visible() { return typeof document === 'undefined' || document.visibilityState !== 'hidden'; }

  onFrame(env) {
    if (env.welcome) return this.onWelcome(env.welcome);
    if (env.deliver) return this.onDeliver(env.deliver.entry);
    if (env.sendAck) return this.onSendAck(env.sendAck);
    if (env.pong) {
      const echoed = num(env.pong.intervalMs);
      if (echoed && this.pendingInterval) { this.interval = echoed; this.pendingInterval = 0; }
      return this.schedule();
    }
    if (env.ping) { this.write({ pong: {} }); return this.schedule(); }
    if (env.queryResult) {
      const q = this.queries.get(env.queryResult.id);
      this.queries.delete(env.queryResult.id);
      if (q) q.resolve(env.queryResult);
      return undefined;
    }
    if (env.kick) {
      const why = env.kick.reason === 'KICK_REASON_TOKEN_REVOKED' ? 'token revoked'
        : env.kick.reason === 'KICK_REASON_REPLACED' ? 'replaced by a newer login' : 'kicked';
      return this.halt(`${why}: ${env.kick.detail || ''}`.trim());
    }
    if (env.goAway) {
      const lo = num(env.goAway.minDelayMs);
      const hi = Math.max(lo, num(env.goAway.maxDelayMs));
      return this.linkDown('server going away', lo + Math.random() * (hi - lo));
    }
    if (env.error) return this.onError(env.error);
    return undefined;
  }

  onWelcome(w) {
    const epoch = num(w.inboxEpoch);
    const start = num(w.startSeq);
    if (epoch !== this.st.inboxEpoch) {
      this.st.inboxEpoch = epoch;
      this.st.lastSeq = start - 1;
    } else if (start - 1 > this.st.lastSeq) {
      // Entries after our position were removed by retention: resume where told.
      this.st.lastSeq = start - 1;
    }
    this.save();
    const hb = w.heartbeat || {};
    this.interval = num(hb.intervalMs) || this.interval;
    this.pongMs = num(hb.pongTimeoutMs) || 5000;
    this.maxMisses = num(hb.maxMisses) || 2;
    this.maxInterval = num(hb.maxIntervalMs) || this.hiddenMs;
    this.attempt = 0;
    this.floorMs = 0;
    this.setState(States.ONLINE);
    // Unacknowledged sends go again, in order; the server dedups by id.
    for (const s of this.st.outbox) this.transmit(s);
    this.schedule();
  }

  onDeliver(entry) {
    if (!entry) return;
    const seq = num(entry.seq);
    if (seq <= this.st.lastSeq) {
      this.duplicatesDropped += 1;
    } else {
      entry.decoded = decodeBody(entry);
      this.st.lastSeq = seq;
      this.st.log.push(entry);
      if (this.st.log.length > LOG_LIMIT) this.st.log.splice(0, this.st.log.length - LOG_LIMIT);
      const r = entry.decoded.receipt;
      if (r && r.by !== this.user) this.applyReceipt(r);
      // Position and entry are saved before the app sees it and before the ACK.
      this.save();
      this.dispatchEvent(Object.assign(new Event('entry'), { entry }));
    }
    this.write({ ack: { seq: String(this.st.lastSeq) } });
  }

  applyReceipt(r) {
    const rank = { stored: 1, delivered: 2, read: 3 };
    for (const [id, s] of Object.entries(this.st.sent)) {
      if (s.to !== r.conversation || !s.messageId || s.messageId > r.upToMessageId) continue;
      if ((rank[s.state] || 0) < rank[r.kind]) this.moved(id, r.kind);
    }
  }

  moved(id, state, extra = {}) {
    const s = Object.assign(this.st.sent[id] || {}, extra, { state });
    this.st.sent[id] = s;
    this.save();
    this.dispatchEvent(Object.assign(new Event('sendstate'), { id, ...s }));
  }

  onSendAck(a) {
    const id = hex(fromB64(a.clientMsgId));
    const i = this.st.outbox.findIndex((s) => s.id === id);
    if (i >= 0) this.st.outbox.splice(i, 1);
    const known = this.st.sent[id];
    if (known && known.state !== 'sending' && known.state !== 'unconfirmed') return;
    this.moved(id, 'stored', { messageId: num(a.messageId), seq: num(a.seq), tsMs: num(a.tsMs) });
  }

  onError(e) {
    if (e.clientMsgId && !e.fatal) {
      // That one send was refused (not committed): it is not retried.
      const id = hex(fromB64(e.clientMsgId));
      this.st.outbox = this.st.outbox.filter((s) => s.id !== id);
      return this.moved(id, 'failed', { error: `${e.code}: ${e.reason}` });
    }
    if (!e.fatal) return undefined;
    if (e.code === 'ERROR_CODE_AUTH_FAILED') return this.halt(`auth failed: ${e.reason}`);
    if (e.code === 'ERROR_CODE_OVERLOADED') this.floorMs = num(e.retryAfterMs);
    return this.linkDown(`closed by the server: ${e.code} ${e.reason}`);
  }

  /** Sends `body` (a string) to a user, or to a group as "g:<group>". Returns its id. */
  send(to, body, contentType = 'text/plain') {
    const s = { id: newMessageId(), kind: 'send', to, body, contentType };
    this.st.outbox.push(s);
    this.st.sent[s.id] = { to, body, state: 'sending', tsMs: Date.now() };
    this.save();
    this.dispatchEvent(Object.assign(new Event('sendstate'), { id: s.id, ...this.st.sent[s.id] }));
    if (this.state === States.ONLINE) this.transmit(s);
    return s.id;
  }

  /** Creates a group (owner: this user) with `members` besides. Returns the op's id. */
  createGroup(group, members, name = '') { return this.groupOp('GROUP_OP_CREATE', group, members, name); }
  /** Adds `members` to a group. */
  addMembers(group, members) { return this.groupOp('GROUP_OP_ADD', group, members); }
  /** Removes `members` from a group (the owner only). */
  removeMembers(group, members) { return this.groupOp('GROUP_OP_REMOVE', group, members); }
  /** Leaves a group. */
  leaveGroup(group) { return this.groupOp('GROUP_OP_LEAVE', group, []); }

  groupOp(op, group, members, name = '') {
    const s = { id: newMessageId(), kind: 'group', op, group, members, name };
    this.st.outbox.push(s);
    this.st.sent[s.id] = { to: `g:${group}`, op, state: 'sending' };
    this.save();
    if (this.state === States.ONLINE) this.transmit(s);
    return s.id;
  }

  transmit(s) {
    const clientMsgId = toB64(unhex(s.id));
    if (s.kind === 'group') {
      this.write({ groupChange: { clientMsgId, group: s.group, op: s.op, members: s.members, name: s.name } });
    } else {
      const target = s.to.startsWith('g:') ? { group: s.to.slice(2) } : { user: s.to };
      this.write({ send: { clientMsgId, ...target, body: toB64(utf8.encode(s.body)), contentType: s.contentType } });
    }
  }

  /** Marks a conversation read up to `entry` (an entry of it from this inbox). */
  markRead(entry) {
    return this.write({
      receipt: {
        conversation: entry.conversation,
        readUpTo: String(entry.seq),
        messageId: String(entry.messageId),
        incoming: String(entry.incoming || 0),
      },
    });
  }

  /** The inbox's conversations, with unread counts (one page). */
  conversations(after = '') {
    const id = this.nextQuery++;
    return new Promise((resolve, reject) => {
      this.queries.set(id, { resolve });
      if (!this.write({ query: { id, conversations: { after } } })) {
        this.queries.delete(id);
        reject(new Error('not connected'));
      }
    });
  }

  applyVisibility() {
    if (this.state !== States.ONLINE) return;
    if (this.visible()) {
      // Shortening takes effect at once.
      this.interval = this.visibleMs;
      this.pendingInterval = 0;
      this.write({ ping: { nextIntervalMs: this.visibleMs } });
      this.pingSentAt = Date.now();
    } else {
      // Lengthening waits for the server's echo.
      this.pendingInterval = Math.min(this.hiddenMs, this.maxInterval);
      this.write({ ping: { nextIntervalMs: this.pendingInterval } });
      this.pingSentAt = Date.now();
    }
    this.schedule();
  }

  schedule() {
    clearTimeout(this.timer);
    if (this.state !== States.ONLINE) return;
    const now = Date.now();
    const due = this.pingSentAt ? this.pingSentAt + this.pongMs : this.lastTx + this.interval;
    this.timer = setTimeout(() => this.tick(), Math.max(0, due - now));
  }

  tick() {
    if (this.state !== States.ONLINE) return;
    const now = Date.now();
    if (this.pingSentAt) {
      if (now - this.pingSentAt >= this.pongMs) {
        this.misses = (this.misses || 0) + 1;
        if (this.misses >= this.maxMisses) {
          return this.linkDown(`heartbeat: ${this.misses} PINGs unanswered (unknown timeout)`);
        }
        this.write({ ping: {} });
        this.pingSentAt = Date.now();
      }
    } else if (now >= this.lastTx + this.interval) {
      this.write({ ping: {} });
      this.pingSentAt = Date.now();
    }
    return this.schedule();
  }

  linkDown(reason, delayMs) {
    clearTimeout(this.timer);
    if (this.state === States.STOPPED) return;
    const ws = this.ws;
    this.ws = null;
    if (ws) { ws.onclose = null; ws.close(); }
    this.pingSentAt = 0;
    for (const s of this.st.outbox) {
      if (this.st.sent[s.id] && this.st.sent[s.id].state === 'sending') this.moved(s.id, 'unconfirmed');
    }
    for (const q of this.queries.values()) q.resolve(null);
    this.queries.clear();
    this.setState(States.OFFLINE, reason);
    const cap = Math.min(this.backoffCap, this.backoffBase * 2 ** this.attempt);
    this.attempt += 1;
    const wait = delayMs ?? Math.max(this.floorMs, Math.random() * cap);
    this.reconnectTimer = setTimeout(() => {
      if (this.state !== States.STOPPED) {
        for (const s of this.st.outbox) if (this.st.sent[s.id]) this.st.sent[s.id].state = 'sending';
        this.connect();
      }
    }, wait);
  }
}
