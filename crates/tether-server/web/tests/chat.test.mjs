// The chat page in Debian's Chromium: two users chat both ways, 1:1 and in a group.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, until } from './harness.mjs';

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

async function login(user) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`page error (${user}):`, e));
  await page.goto(`${server.base}/`);
  await page.fill('input[name=user]', user);
  await page.click('#login button');
  await page.waitForSelector('[data-testid=conn][data-state=online]', { timeout: 10000 });
  // Every state a message of this page went through, in order.
  await page.evaluate(() => {
    window.trail = {};
    window.client.addEventListener('sendstate', (e) => {
      (window.trail[e.id] ||= []).push(e.state);
    });
  });
  return page;
}

async function openChat(page, to) {
  await page.fill('#new-chat input[name=to]', to);
  await page.click('#new-chat button');
}

async function say(page, text) {
  await page.fill('#composer input[name=text]', text);
  await page.click('#composer button');
}

const bubbles = (page) => page.$$eval('[data-testid=msg]', (ms) => ms.map((m) => ({
  text: m.firstChild.textContent, state: m.dataset.state, mine: m.classList.contains('mine'),
})));

test('two pages chat both ways, 1:1; states go sending → stored → delivered → read', async () => {
  const ada = await login('ada');
  const bo = await login('bo');
  await openChat(ada, 'bo');
  await say(ada, 'hi bo');
  // bo has not opened the conversation: an unread count, and no read receipt yet.
  await bo.waitForSelector('[data-testid="conv-ada"] [data-testid=unread][data-count="1"]', { timeout: 10000 });
  await until(async () => (await bubbles(ada)).some((b) => b.text === 'hi bo' && b.state === 'delivered'), 10000, 'delivered');
  // bo opens it: the message is read, and ada sees it.
  await bo.click('[data-testid="conv-ada"]');
  await until(async () => (await bubbles(bo)).some((b) => b.text === 'hi bo' && !b.mine), 10000, 'shown to bo');
  await until(async () => (await bubbles(ada)).some((b) => b.text === 'hi bo' && b.state === 'read'), 10000, 'read');
  const trail = Object.values(await ada.evaluate(() => window.trail))[0];
  assert.deepEqual(trail, ['sending', 'stored', 'delivered', 'read']);
  assert.equal(await bo.getAttribute('[data-testid="conv-ada"] [data-testid=unread]', 'data-count'), '0');

  await say(bo, 'hi ada');
  await until(async () => (await bubbles(ada)).some((b) => b.text === 'hi ada' && !b.mine), 10000, 'the answer');
  await until(async () => (await bubbles(bo)).some((b) => b.text === 'hi ada' && b.state === 'read'), 10000, 'the answer read');
  await ada.context().close();
  await bo.context().close();
});

test('two pages chat in a group', async () => {
  const cy = await login('cy');
  const di = await login('di');
  await cy.fill('#new-group input[name=group]', 'crew');
  await cy.fill('#new-group input[name=members]', 'di');
  await cy.click('#new-group button');
  await say(cy, 'welcome to crew');
  await di.waitForSelector('[data-testid="conv-g:crew"]', { timeout: 10000 });
  await di.click('[data-testid="conv-g:crew"]');
  await until(async () => (await bubbles(di)).some((b) => b.text === 'welcome to crew'), 10000, 'group message at di');
  await say(di, 'thanks cy');
  await until(async () => (await bubbles(cy)).some((b) => b.text === 'thanks cy' && !b.mine), 10000, 'group answer at cy');
  // Everyone else in the group (di) read cy's message: the aggregate receipt says read.
  await until(async () => (await bubbles(cy)).some((b) => b.text === 'welcome to crew' && b.state === 'read'), 10000, 'group read');
  const connText = await cy.textContent('[data-testid=conn]');
  assert.equal(connText, 'online');
  await cy.context().close();
  await di.context().close();
});

test('a kicked page shows the reason and stays off', async () => {
  const eve = await login('eve');
  const res = await fetch(`${server.base}/admin/v1/users/eve/devices/${await eve.evaluate(() => window.client.device)}/kick`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ reason: 'suspicious activity' }),
  });
  assert.equal(res.status, 200);
  await eve.waitForSelector('[data-testid=conn][data-state=stopped]', { timeout: 10000 });
  assert.match(await eve.textContent('[data-testid=conn]'), /stopped: kicked: suspicious activity/);
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(await eve.getAttribute('[data-testid=conn]', 'data-state'), 'stopped');
  await eve.context().close();
});
