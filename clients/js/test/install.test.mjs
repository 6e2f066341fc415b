// The README's install line, run as written (with the path of this checkout), and the module
// imported by its package name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const CLIENT = dirname(dirname(fileURLToPath(import.meta.url)));

test("the README's install line installs a module importable as tether-client", () => {
  const readme = readFileSync(join(CLIENT, 'README.md'), 'utf8');
  const line = readme.split('\n').find((l) => l.startsWith('npm install ./tether/clients/js'));
  assert.ok(line, 'the README has its install line');
  const args = line.split(/\s+/).slice(1).map((a) => (a === './tether/clients/js' ? CLIENT : a));
  const app = mkdtempSync(join(tmpdir(), 'tether-install-'));
  try {
    writeFileSync(join(app, 'package.json'), '{"name": "app", "version": "1.0.0", "type": "module"}');
    execFileSync('npm', [...args, '--offline', '--no-audit', '--no-fund'], { cwd: app, stdio: 'pipe' });
    writeFileSync(
      join(app, 'main.mjs'),
      "import { Client } from 'tether-client';\nconsole.log(typeof Client);\n",
    );
    const out = execFileSync(process.execPath, ['main.mjs'], { cwd: app }).toString().trim();
    assert.equal(out, 'function');
  } finally {
    rmSync(app, { recursive: true, force: true });
  }
});
