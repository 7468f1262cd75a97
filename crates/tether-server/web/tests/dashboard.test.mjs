// The live dashboard in Chromium while a load runs: its numbers move, and once the
// load stops they are /metrics' numbers.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { startServer, launchBrowser, openClient, cli, until } from './harness.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const value = (page, id) => page.textContent(`[data-testid="${id}"]`).then(Number);

async function metrics() {
  const text = await (await fetch(`${server.base}/metrics`)).text();
  const total = (name) => text.split('\n')
    .filter((l) => l.startsWith(name) && (l[name.length] === ' ' || l[name.length] === '{'))
    .reduce((a, l) => a + Number(l.split(' ').at(-1)), 0);
  return {
    sessions: total('tether_sessions'),
    committed: total('tether_messages_committed_total'),
    delivered: total('tether_messages_delivered_total'),
    logins: total('tether_logins_total'),
  };
}

test('the dashboard shows live numbers during a load, and /metrics\' numbers after it', async () => {
  const context = await browser.newContext();
  const dash = await context.newPage();
  await dash.setViewportSize({ width: 1280, height: 800 });
  await dash.goto(`${server.base}/dashboard`);
  await dash.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 1);

  // The load: four browser sessions over WebSocket, and a CLI user writing to them.
  const pages = [];
  for (let i = 0; i < 4; i++) pages.push(await openClient(context, server, `load${i}`, 'tab', { heartbeatMs: 5000 }));
  // One device of one user: its sends go one after the other.
  const sends = (async () => {
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 4; i++) await cli(server, ['send', '--user', 'feeder', '--to', `load${i}`, `m${round}`]);
    }
  })();
  // While it runs, the dashboard sees sessions and traffic.
  await until(async () => (await value(dash, 'sessions')) >= 4, 10000, 'sessions on the dashboard');
  await until(async () => (await value(dash, 'in-rate')) > 0 || (await value(dash, 'committed')) > 0, 10000, 'traffic on the dashboard');
  await sends;
  await until(async () => {
    const counts = await Promise.all(pages.map((p) => p.evaluate(() => window.client.entries.filter((e) => e.type === 'ENTRY_TYPE_MESSAGE').length)));
    return counts.every((n) => n === 3);
  }, 15000, 'every message delivered');

  // Quiet now: after two more refreshes the page must show exactly what /metrics says.
  const seen = Number(await dash.evaluate(() => document.body.dataset.updates));
  await dash.waitForFunction((n) => Number(document.body.dataset.updates) >= n + 2, seen, { timeout: 10000 });
  const m = await metrics();
  const shown = {
    sessions: await value(dash, 'sessions'),
    committed: await value(dash, 'committed'),
    delivered: await value(dash, 'delivered'),
    logins: await value(dash, 'logins'),
  };
  assert.deepEqual(shown, m);
  assert.ok(m.committed >= 12, `12 messages committed: ${m.committed}`);
  assert.equal(m.sessions, 4);
  assert.match(await dash.textContent('[data-testid="by-transport"]'), /ws 4/);
  assert.match(await dash.textContent('[data-testid="by-mode"]'), /idle 4/);

  const dir = resolve(new URL('.', import.meta.url).pathname, '../../../../target/web');
  mkdirSync(dir, { recursive: true });
  await dash.screenshot({ path: `${dir}/dashboard.png`, fullPage: true });
  console.log(`# screenshot: ${dir}/dashboard.png`);
  await context.close();
});
