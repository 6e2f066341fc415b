// Shared by the browser tests: start a tether binary on a free port, launch Chromium.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The release `tether` binary (built by scripts/test before the browser tests). */
export const tetherBin = process.env.TETHER_BIN ?? path.join(root, 'target', 'release', 'tether');

/**
 * Runs `tether ARGS... --port 0` and resolves with { url, stop } once it prints
 * "listening on ws://ADDR/". Rejects if it exits or stays silent for 15 s.
 */
export function startTether(args) {
  const child = spawn(tetherBin, [...args, '--port', '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { child.kill(); reject(new Error('tether did not start in 15 s')); }, 15000);
    child.on('exit', (code) => reject(new Error(`tether exited with ${code}`)));
    const lines = createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      const m = /^listening on (\S+)$/.exec(line.trim());
      if (m) {
        clearTimeout(timer);
        resolve({ url: m[1], stop: () => child.kill() });
      }
    });
  });
}

/**
 * Debian's Chromium, headless, with the flags this sandbox needs. The first start on a fresh
 * machine reads the whole browser from a cold disk (it once took over 30 s there): the launch is
 * not what these tests measure, so it may take two minutes.
 */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    timeout: 120000,
  });
}

/** A fresh, empty data directory for `tether serve` and `tether user add`. */
export function freshDataDir() {
  return mkdtempSync(path.join(os.tmpdir(), 'tether-e2e-'));
}

/**
 * Runs `tether serve --listen 127.0.0.1:0 --data DIR ...extraArgs` and resolves with
 * { url, dataDir, stop } once it prints "listening on http://ADDR/" (or https:// with TLS);
 * `url` is `http://ADDR` (no trailing slash). `stop()` sends SIGTERM and resolves once the server has exited (SIGKILL
 * after 10 s). Pass `{ dataDir }` to reuse a directory: users added beforehand, or a restart.
 * Rejects if the server exits first or stays silent for 15 s.
 */
export function startServe(extraArgs = [], { dataDir = freshDataDir(), listen = '127.0.0.1:0' } = {}) {
  const args = ['serve', '--listen', listen, '--data', dataDir, ...extraArgs];
  // Sessions are logged at debug: a failed test's output shows who joined and how each ended.
  const env = { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info,tether_server=debug' };
  const child = spawn(tetherBin, args, { stdio: ['ignore', 'pipe', 'inherit'], env });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal)));
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const killer = setTimeout(() => child.kill('SIGKILL'), 10000);
    await exited;
    clearTimeout(killer);
  };
  return new Promise((resolve, reject) => {
    let listening = false;
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`tether ${args.join(' ')} did not start in 15 s`));
    }, 15000);
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
    exited.then((status) => {
      if (listening) return;
      clearTimeout(timer);
      reject(new Error(`tether ${args.join(' ')} exited with ${status} before listening`));
    });
    const lines = createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      const m = /^listening on (https?:\/\/[^/\s]+)\/$/.exec(line.trim());
      if (m && !listening) {
        listening = true;
        clearTimeout(timer);
        resolve({ url: m[1], dataDir, stop });
      }
    });
  });
}

/**
 * Runs `tether user add NAME --data DIR --password-stdin` with PASSWORD on standard input
 * (run it before `startServe` on the same directory). Rejects unless it exits 0 within 30 s.
 */
export function addUser(dataDir, name, password) {
  const args = ['user', 'add', name, '--data', dataDir, '--password-stdin'];
  const child = spawn(tetherBin, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk) => { output += chunk; });
  child.stderr.on('data', (chunk) => { output += chunk; });
  child.stdin.on('error', () => {}); // it may exit before reading; the exit code says why
  child.stdin.end(`${password}\n`);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`tether ${args.join(' ')} did not finish in 30 s`));
    }, 30000);
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new Error(`tether ${args.join(' ')} exited with ${code ?? signal}: ${output.trim()}`));
    });
  });
}

/** POST /api/tokens {"user","password"} → the bearer token (expects 201). */
export async function getToken(url, user, password) {
  const res = await fetch(`${url}/api/tokens`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user, password }),
  });
  const body = await res.json().catch(() => null);
  if (res.status !== 201 || typeof body?.token !== 'string') {
    throw new Error(`POST /api/tokens answered ${res.status}: ${JSON.stringify(body)}`);
  }
  return body.token;
}

/** e2e/artifacts/NAME (the directory is created; it is ignored by git). */
export function artifact(name) {
  const dir = path.join(root, 'e2e', 'artifacts');
  mkdirSync(dir, { recursive: true });
  return path.join(dir, name);
}

/**
 * A self-signed certificate for `localhost` and 127.0.0.1, made by `openssl` (scripts/test
 * installs it when missing) in a fresh directory: { cert, key } paths and the certificate's PEM.
 */
export function selfSignedCertificate() {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'tether-e2e-tls-'));
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
  ], { stdio: 'ignore' });
  return { cert, key, pem: readFileSync(cert) };
}
