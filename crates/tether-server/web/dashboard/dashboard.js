// The live dashboard: reads /metrics once a second, keeps two minutes of rates, draws
// them on canvases. No library; one fetch and a few hundred numbers per second.

const HISTORY = 120;
const COLORS = ['#5b8def', '#3ecf6e', '#f0b429', '#e5484d', '#b57bee', '#35c3d6', '#ff8a4c', '#9aa4b5'];
const $ = (id) => document.getElementById(id);
const tid = (t) => document.querySelector(`[data-testid="${t}"]`);

/** Prometheus text → Map name → [{labels, value}]. */
export function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[2] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (m, name) => (m.get(name) || []).reduce((a, s) => a + s.value, 0);
const byLabel = (m, name, label) => Object.fromEntries((m.get(name) || []).map((s) => [s.labels[label], s.value]));

/** Cumulative buckets → per-bucket counts, as [[le, count]]. */
function buckets(m, name) {
  const rows = (m.get(`${name}_bucket`) || []).map((s) => [s.labels.le, s.value]);
  return rows.map(([le, v], i) => [le, v - (i ? rows[i - 1][1] : 0)]);
}

const series = new Map();
function push(key, value) {
  if (!series.has(key)) series.set(key, []);
  const s = series.get(key);
  s.push(value);
  if (s.length > HISTORY) s.shift();
}

function lines(canvasId, legendId, keys) {
  const c = $(canvasId);
  const w = (c.width = c.clientWidth * devicePixelRatio);
  const h = (c.height = c.clientHeight * devicePixelRatio);
  const g = c.getContext('2d');
  const max = Math.max(1, ...keys.flatMap((k) => series.get(k) || []));
  keys.forEach((k, i) => {
    const s = series.get(k) || [];
    g.strokeStyle = COLORS[i % COLORS.length];
    g.lineWidth = devicePixelRatio * 1.5;
    g.beginPath();
    s.forEach((v, j) => {
      const x = w - (s.length - 1 - j) * (w / (HISTORY - 1));
      const y = h - (v / max) * (h - 4) - 2;
      if (j) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
  });
  g.fillStyle = '#8a93a6';
  g.font = `${10 * devicePixelRatio}px system-ui`;
  g.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 11 * devicePixelRatio);
  if (legendId) {
    $(legendId).replaceChildren(...keys.map((k, i) => {
      const span = document.createElement('span');
      span.innerHTML = `<i style="background:${COLORS[i % COLORS.length]}"></i>`;
      span.append(k.split(':').at(-1));
      return span;
    }));
  }
}

function bars(canvasId, rows, scale = 1) {
  const c = $(canvasId);
  const w = (c.width = c.clientWidth * devicePixelRatio);
  const h = (c.height = c.clientHeight * devicePixelRatio);
  const g = c.getContext('2d');
  const shown = rows.filter(([le]) => le !== '+Inf');
  const max = Math.max(1, ...shown.map(([, v]) => v));
  const bw = w / Math.max(1, shown.length);
  g.font = `${9 * devicePixelRatio}px system-ui`;
  shown.forEach(([le, v], i) => {
    const bh = (v / max) * (h - 16 * devicePixelRatio);
    g.fillStyle = '#5b8def';
    g.fillRect(i * bw + 2, h - 12 * devicePixelRatio - bh, bw - 4, bh);
    g.fillStyle = '#8a93a6';
    const label = Number(le) * scale;
    g.fillText(label >= 1 ? String(+label.toFixed(1)) : label.toPrecision(1), i * bw + 2, h - 2);
  });
}

let last = null;
async function tick() {
  let text;
  try {
    const res = await fetch('/metrics', { cache: 'no-store' });
    text = await res.text();
  } catch (e) {
    tid('status').textContent = `cannot read /metrics: ${e.message}`;
    return;
  }
  const m = parseMetrics(text);
  const now = performance.now();
  const totals = {
    committed: sum(m, 'tether_messages_committed_total'),
    delivered: sum(m, 'tether_messages_delivered_total'),
    logins: sum(m, 'tether_logins_total'),
    heartbeats: sum(m, 'tether_heartbeats_total'),
    disconnects: byLabel(m, 'tether_disconnects_total', 'reason'),
  };
  const rate = (k) => (last ? Math.max(0, (totals[k] - last.totals[k]) / ((now - last.at) / 1000)) : 0);
  const sessions = byLabel(m, 'tether_sessions', 'transport');
  const total = Object.values(sessions).reduce((a, v) => a + v, 0);

  tid('sessions').textContent = String(total);
  tid('by-transport').textContent = Object.entries(sessions).map(([t, v]) => `${t} ${v}`).join(' · ');
  const modes = byLabel(m, 'tether_sessions_by_heartbeat_mode', 'mode');
  tid('by-mode').textContent = `heartbeat: ${Object.entries(modes).map(([k, v]) => `${k} ${v}`).join(' · ')}`;
  tid('committed').textContent = String(totals.committed);
  tid('delivered').textContent = String(totals.delivered);
  tid('logins').textContent = String(totals.logins);
  tid('heartbeats').textContent = String(totals.heartbeats);
  tid('in-rate').textContent = rate('committed').toFixed(1);
  tid('out-rate').textContent = rate('delivered').toFixed(1);
  tid('login-rate').textContent = rate('logins').toFixed(1);
  tid('hb-rate').textContent = rate('heartbeats').toFixed(1);
  tid('expired').textContent = String(sum(m, 'tether_sessions_expired_total'));
  tid('throttled').textContent = String(sum(m, 'tether_logins_throttled_total'));

  push('in', rate('committed'));
  push('out', rate('delivered'));
  for (const [t, v] of Object.entries(sessions)) push(`sessions:${t}`, v);
  push('disc:logins', rate('logins'));
  for (const [reason, v] of Object.entries(totals.disconnects)) {
    push(`disc:${reason}`, last ? Math.max(0, (v - (last.totals.disconnects[reason] || 0)) / ((now - last.at) / 1000)) : 0);
  }
  lines('c-msgs', 'l-msgs', ['in', 'out']);
  lines('c-sessions', 'l-sessions', [...series.keys()].filter((k) => k.startsWith('sessions:')));
  lines('c-disc', 'l-disc', [...series.keys()].filter((k) => k.startsWith('disc:')));
  bars('c-intervals', buckets(m, 'tether_heartbeat_interval_seconds'));
  bars('c-rtt', buckets(m, 'tether_tcp_rtt_seconds'), 1000);
  bars('c-commit', buckets(m, 'tether_commit_latency_seconds'), 1000);

  last = { at: now, totals };
  tid('status').textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

tick();
setInterval(tick, 1000);
