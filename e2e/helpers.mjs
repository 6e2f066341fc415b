// Shared by the browser tests: start a tether binary on a free port, launch Chromium.
import { spawn } from 'node:child_process';
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

/** Debian's Chromium, headless, with the flags this sandbox needs. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    timeout: 30000,
  });
}
