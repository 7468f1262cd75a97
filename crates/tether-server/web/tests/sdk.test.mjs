// The browser SDK in Debian's Chromium against a real `tether serve`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, openClient, cli, admin, texts, until } from './harness.mjs';

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

test('a browser user and a CLI user over TCP message each other', async () => {
  const context = await browser.newContext();
  const page = await openClient(context, server, 'webby', 'chromium');

  await cli(server, ['send', '--user', 'clio', '--to', 'webby', 'hello from the terminal']);
  await until(async () => (await texts(page)).length === 1, 10000, 'the CLI message in the page');
  assert.deepEqual(await texts(page), ['hello from the terminal']);
  const first = await page.evaluate(() => window.client.entries.find((e) => e.type === 'ENTRY_TYPE_MESSAGE'));
  assert.equal(first.from, 'clio');
  assert.equal(first.conversation, 'clio');

  const id = await page.evaluate(() => window.client.send('clio', 'hello from Chromium'));
  await until(() => page.evaluate((id) => window.client.sends[id].state !== 'sending', id), 10000, 'SEND_ACK');
  // clio's inbox also holds webby's delivered receipt for the first message, before or
  // after this one depending on when the page ACKed: read entries one at a time until
  // the message shows up.
  const seen = [];
  let fromWeb;
  while (!fromWeb && seen.length < 5) {
    const out = await cli(server, ['recv', '--user', 'clio', '--count', '1', '--timeout', '10']);
    const entry = JSON.parse(out.trim());
    seen.push(entry);
    if (entry.type === 'message' && entry.from === 'webby') fromWeb = entry;
  }
  assert.ok(fromWeb, `the CLI got no message from the page: ${JSON.stringify(seen)}`);
  assert.ok(seen.every((e) => e.type !== 'message' || e === fromWeb || e.from === 'clio'), JSON.stringify(seen));
  assert.equal(fromWeb.text ?? fromWeb.body, 'hello from Chromium', JSON.stringify(fromWeb));

  // clio's device ACKed it: a delivered receipt reaches the page.
  await until(() => page.evaluate((id) => ['delivered', 'read'].includes(window.client.sends[id].state), id), 10000, 'delivered');
  await context.close();
});

test('a reload resumes from the stored position: nothing twice, nothing missing', async () => {
  const context = await browser.newContext();
  let page = await openClient(context, server, 'rhea', 'tab');
  for (let i = 1; i <= 5; i++) await cli(server, ['send', '--user', 'sam', '--to', 'rhea', `m${i}`]);
  await until(async () => (await texts(page)).length === 5, 10000, 'five messages');

  await page.reload();
  await page.waitForFunction(() => window.Tether);
  // Before the new client starts: what the page stored is what it had.
  const stored = await page.evaluate(() => JSON.parse(localStorage.getItem('tether:rhea:tab')));
  assert.equal(stored.log.filter((e) => e.type === 'ENTRY_TYPE_MESSAGE').length, 5);
  await page.close();

  for (let i = 6; i <= 8; i++) await cli(server, ['send', '--user', 'sam', '--to', 'rhea', `m${i}`]);
  page = await openClient(context, server, 'rhea', 'tab');
  for (let i = 9; i <= 10; i++) await cli(server, ['send', '--user', 'sam', '--to', 'rhea', `m${i}`]);
  await until(async () => (await texts(page)).length >= 10, 10000, 'ten messages');
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(await texts(page), Array.from({ length: 10 }, (_, i) => `m${i + 1}`));
  const seqs = await page.evaluate(() => window.client.entries.map((e) => Number(e.seq)));
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `seqs in order: ${seqs}`);
  await context.close();
});

test('admin push reaches a page, kick stops it with the reason and no reconnect', async () => {
  const context = await browser.newContext();
  const page = await openClient(context, server, 'pia', 'laptop', { backoffBaseMs: 50, backoffCapMs: 200 });

  const pushed = await admin(server, 'POST', '/admin/v1/users/pia/messages', { body: 'from the operators', from: 'ops' });
  assert.equal(pushed.status, 200, JSON.stringify(pushed.json));
  await until(async () => (await texts(page)).includes('from the operators'), 10000, 'the pushed message');

  const refused = await admin(server, 'POST', '/admin/v1/users/pia/devices/laptop/kick', {}, null);
  assert.equal(refused.status, 401);
  assert.equal(await page.evaluate(() => window.client.state), 'online');

  const kicked = await admin(server, 'POST', '/admin/v1/users/pia/devices/laptop/kick', { reason: 'security review' });
  assert.equal(kicked.status, 200, JSON.stringify(kicked.json));
  await until(() => page.evaluate(() => window.client.state === 'stopped'), 10000, 'stopped');
  const reason = await page.evaluate(() => window.client.reason);
  assert.match(reason, /kicked/);
  assert.match(reason, /security review/);
  // Well past the backoff cap: still stopped, never reconnected.
  await new Promise((r) => setTimeout(r, 1500));
  const states = await page.evaluate(() => window.events.filter((e) => e.kind === 'state').map((e) => e.state));
  assert.equal(states.at(-1), 'stopped');
  assert.equal(states.filter((s) => s === 'connecting').length, 1, `states: ${states}`);
  const presence = await admin(server, 'GET', '/admin/v1/users/pia/presence');
  assert.equal(presence.json.online, false);
  await context.close();
});

test('development login is off unless the server is started with --dev-login', async () => {
  const off = await startServer([], { devLogin: false });
  try {
    const res = await fetch(`${off.base}/dev/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"user":"eve"}' });
    assert.equal(res.status, 404);
    assert.match((await res.json()).error, /--dev-login/);
  } finally {
    await off.stop();
  }
  const on = await fetch(`${server.base}/dev/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"user":"eve"}' });
  assert.equal(on.status, 200);
  assert.ok((await on.json()).token.split('.').length === 3);
});

test('a hidden tab asks for the long interval and switches only on the echo; visible again, at once', async () => {
  const context = await browser.newContext();
  const page = await openClient(context, server, 'hal', 'tab', { heartbeatMs: 20000, hiddenHeartbeatMs: 180000 });
  const interval = async () => {
    const s = await admin(server, 'GET', '/admin/v1/users/hal/sessions');
    return s.json.connected[0].heartbeat_interval_ms;
  };
  assert.equal(await interval(), 20000);
  // Headless Chromium does not hide tabs: tell the page it is hidden, as a browser would.
  const setHidden = (hidden) => page.evaluate((hidden) => {
    Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (hidden ? 'hidden' : 'visible') });
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
  await setHidden(true);
  await until(async () => (await interval()) === 180000, 5000, 'the server to grant the hidden interval');
  await until(() => page.evaluate(() => window.client.interval === 180000), 5000, 'the client to switch on the echo');
  assert.equal(await page.evaluate(() => window.client.state), 'online');
  await setHidden(false);
  assert.equal(await page.evaluate(() => window.client.interval), 20000, 'shortening is immediate');
  await until(async () => (await interval()) === 20000, 5000, 'the server to follow');
  await context.close();
});
