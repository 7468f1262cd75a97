// A page whose network dies without a close: Chromium runs inside a network namespace
// joined to the server by a veth pair, and nftables drops every IP packet on the link
// (ARP still passes, so nothing fails fast: the socket is silently dead). Needs root.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync, chmodSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, launchBrowser, openClient, cli, texts, until, CHROMIUM } from './harness.mjs';

if (process.getuid() !== 0) throw new Error('this test needs root (network namespaces, nftables); run it as root');

const tag = String(process.pid % 100000);
const ns = `twb${tag}`;
const hostIf = `twh${tag}`;
const nsIf = `twn${tag}`;
const net = 10 + (process.pid % 200);
const hostIp = `10.213.${net}.1`;
const nsIp = `10.213.${net}.2`;

const sh = (cmd, ...args) => execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
const inNs = (...args) => sh('ip', 'netns', 'exec', ns, ...args);

let server;
let browser;

function blackhole(on) {
  // Both ends of the link drop IP at ingress; ARP is untouched.
  const ruleset = (dev) => `table netdev tether_bh {\n  chain drop_ip {\n    type filter hook ingress device "${dev}" priority -500;\n    meta protocol ip drop\n  }\n}\n`;
  const nft = (prefix, input) => execFileSync(prefix[0], [...prefix.slice(1), 'nft', '-f', '-'], { input, stdio: ['pipe', 'pipe', 'pipe'] });
  if (on) {
    nft(['ip', 'netns', 'exec', ns], ruleset(nsIf));
    nft(['env'], ruleset(hostIf));
  } else {
    nft(['ip', 'netns', 'exec', ns], 'delete table netdev tether_bh\n');
    nft(['env'], 'delete table netdev tether_bh\n');
  }
}

before(async () => {
  sh('ip', 'netns', 'add', ns);
  sh('ip', 'link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
  sh('ip', 'link', 'set', nsIf, 'netns', ns);
  sh('ip', 'addr', 'add', `${hostIp}/30`, 'dev', hostIf);
  sh('ip', 'link', 'set', hostIf, 'up');
  inNs('ip', 'addr', 'add', `${nsIp}/30`, 'dev', nsIf);
  inNs('ip', 'link', 'set', nsIf, 'up');
  inNs('ip', 'link', 'set', 'lo', 'up');
  server = await startServer([], { httpHost: hostIp });
  // Chromium started inside the namespace; Playwright talks to it over a pipe.
  const dir = mkdtempSync(join(tmpdir(), 'tether-ns-'));
  const wrapper = join(dir, 'chromium-in-ns');
  writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${ns} ${CHROMIUM} "$@"\n`);
  chmodSync(wrapper, 0o755);
  browser = await launchBrowser(wrapper);
});

after(async () => {
  await browser?.close();
  await server?.stop();
  try { sh('nft', 'delete table netdev tether_bh'); } catch { /* not set */ }
  try { sh('ip', 'link', 'del', hostIf); } catch { /* gone with the namespace */ }
  try { sh('ip', 'netns', 'del', ns); } catch { /* not created */ }
});

test('a silently dead link is noticed within I + m·P, and all 20 messages arrive once, in order, when it returns', async () => {
  const context = await browser.newContext();
  // I = 5 s (the server's minimum), P = 5 s, m = 2: dead within 15 s of the last answer.
  const page = await openClient(context, server, 'nia', 'ns-tab', { heartbeatMs: 5000, backoffBaseMs: 200, backoffCapMs: 1000, connectTimeoutMs: 3000 });
  await cli(server, ['send', '--user', 'otto', '--to', 'nia', 'before']);
  await until(async () => (await texts(page)).length === 1, 10000, 'the first message');

  const cut = Date.now();
  blackhole(true);
  for (let i = 1; i <= 20; i++) await cli(server, ['send', '--user', 'otto', '--to', 'nia', `during ${i}`]);
  const offline = await until(() => page.evaluate(() => {
    const e = window.events.find((x) => x.kind === 'state' && x.state === 'offline');
    return e ? { at: e.at, reason: e.reason } : null;
  }), 25000, 'the page to notice');
  const noticed = (offline.at - cut) / 1000;
  // Not before m·P (the last PING may have been answered just before the cut), and
  // not after I + m·P plus two seconds of timer slack.
  assert.ok(noticed >= 9.5 && noticed <= 17, `noticed after ${noticed} s (${offline.reason})`);
  console.log(`# noticed ${noticed.toFixed(1)} s after the cut: ${offline.reason}`);
  assert.match(offline.reason, /heartbeat/);
  assert.equal((await texts(page)).length, 1, 'nothing got through the blackhole');

  blackhole(false);
  await until(() => page.evaluate(() => window.client.state === 'online'), 20000, 'reconnect');
  await until(async () => (await texts(page)).length >= 21, 10000, 'the 20 messages');
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(await texts(page), ['before', ...Array.from({ length: 20 }, (_, i) => `during ${i + 1}`)]);
  await context.close();
});
