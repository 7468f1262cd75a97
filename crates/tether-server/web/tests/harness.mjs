// Shared pieces of the browser tests: a real `tether serve` child, Debian's Chromium
// through playwright-core, the CLI, and pages holding SDK clients.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const here = new URL('.', import.meta.url).pathname;
export const TETHER = process.env.TETHER_BIN || resolve(here, '../../../../target/debug/tether');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

if (!existsSync(TETHER)) throw new Error(`no tether binary at ${TETHER}: build it first (cargo build -p tether) or set TETHER_BIN`);
if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium (the test command does)`);

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.on('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** Starts `tether serve` with development login; resolves once it listens. */
export async function startServer(extra = [], { devLogin = true, httpHost = '127.0.0.1' } = {}) {
  const data = mkdtempSync(join(tmpdir(), 'tether-web-'));
  const tcp = await freePort();
  const http = await freePort();
  const args = ['serve', '--data', data, '--listen', `127.0.0.1:${tcp}`, '--http', `${httpHost}:${http}`, ...(devLogin ? ['--dev-login'] : []), ...extra];
  const proc = spawn(TETHER, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, TETHER_LOG: 'info' } });
  let log = '';
  await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`server did not start:\n${log}`)), 20000);
    proc.stderr.on('data', (chunk) => {
      log += chunk;
      if (log.includes('tether server listening')) { clearTimeout(timer); ok(); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); fail(new Error(`server exited (${code}):\n${log}`)); });
  });
  proc.stderr.removeAllListeners('data');
  proc.stderr.on('data', (chunk) => { log += chunk; });
  const adminToken = readFileSync(join(data, 'admin-token'), 'utf8').trim();
  return {
    data, tcp, http, proc, adminToken,
    base: `http://${httpHost}:${http}`,
    log: () => log,
    stop: () => new Promise((ok) => { proc.once('exit', ok); proc.kill('SIGKILL'); }),
  };
}

/** Runs the CLI against `server`; resolves with its stdout (rejects on failure). */
export function cli(server, args, { timeoutMs = 20000 } = {}) {
  const full = [...args, '--server', `127.0.0.1:${server.tcp}`, '--data', server.data, '--state-dir', join(server.data, 'cli-state')];
  return new Promise((ok, fail) => {
    const p = spawn(TETHER, full, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (c) => { out += c; });
    p.stderr.on('data', (c) => { err += c; });
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) ok(out);
      else fail(new Error(`tether ${full.join(' ')} exited ${code}\n${err}`));
    });
  });
}

/** Chromium as this machine allows it (root, closed network). */
export function launchBrowser(executablePath = CHROMIUM) {
  return chromium.launch({
    executablePath,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

/** An admin API call. */
export async function admin(server, method, path, body, token = server.adminToken) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(`${server.base}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, json: await res.json().catch(() => null) };
}

/**
 * A page on the server's SDK page with a started client in `window.client`; every
 * event is recorded in `window.events`.
 */
export async function openClient(context, server, user, device, options = {}) {
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`page error (${user}/${device}):`, e));
  await page.goto(`${server.base}/sdk/`);
  await page.waitForFunction(() => window.Tether);
  await page.evaluate(async ({ user, device, options }) => {
    const res = await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
    const { token } = await res.json();
    const client = new window.Tether.TetherClient({ url: `ws://${location.host}/ws`, user, token, device, ...options });
    window.events = [];
    for (const kind of ['state', 'entry', 'sendstate']) {
      client.addEventListener(kind, (e) => window.events.push({ kind, state: e.state, reason: e.reason, id: e.id, entry: e.entry, at: Date.now() }));
    }
    window.client = client;
    client.start();
  }, { user, device, options });
  await page.waitForFunction(() => window.client.state === 'online', null, { timeout: 10000 });
  return page;
}

/** The texts of the message entries the page's client has, in order. */
export function texts(page) {
  return page.evaluate(() => window.client.entries
    .filter((e) => e.type === 'ENTRY_TYPE_MESSAGE' && e.from !== window.client.user)
    .map((e) => e.decoded.text));
}

/** Polls `f` until it returns a truthy value (or fails after `ms`). */
export async function until(f, ms = 10000, what = 'condition') {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
