#!/usr/bin/env python3
"""Run the Autobahn TestSuite against tether and summarise the results.

    python3 conformance/run.py server|client|all|server-h2|client-h2|h2
        [--exclude '12.*,13.*'] [--cases '*'] [--venv DIR] [--reports DIR] [--no-build]

server: Autobahn's fuzzingclient tests `tether echo`, which sets a connection aside after 100 ms
of quiet (`--park-after`), so that every pause of a case (a fragment, a ping, a close held back
for a second) takes the connection out of its task and brings it back.
client: tether's autobahn_client example is tested by Autobahn's fuzzingserver.
all: both.
server-h2, client-h2, h2: the same over HTTP/2 (RFC 8441). The suite speaks HTTP/1.1 only, so
the autobahn_h2 example relays each of its WebSockets onto a stream of one HTTP/2 connection
(the handshake translated, every byte after it unchanged): to an echo server of tether's over
h2 (server-h2), or from tether's client over h2 (client-h2).

Exit status: 0 when every selected case ran and is OK or INFORMATIONAL;
1 when a case is anything else, or the report is missing or has fewer
cases than the spec selects; 2 on a setup error (venv, build, no matching
cases, a process that would not start or listen, a timeout).

Python 3 standard library only. Autobahn itself needs Python 2.7, which is
taken from pyenv and installed into a virtualenv on first use.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
AGENT = "tether"
PASSING = ("OK", "INFORMATIONAL")
VERDICTS = ("OK", "INFORMATIONAL", "NON-STRICT", "FAILED", "UNIMPLEMENTED")


class SetupError(Exception):
    """Something other than a test case went wrong."""


def log(msg):
    print(f"[conformance] {msg}", flush=True)


def run_step(cmd, timeout, **kw):
    """Run a command to completion (bounded), raising SetupError on failure."""
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    try:
        subprocess.run([str(c) for c in cmd], check=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        raise SetupError(f"timed out after {timeout}s: {cmd[0]}")
    except (subprocess.CalledProcessError, OSError) as e:
        raise SetupError(str(e))


# --- child processes ---------------------------------------------------------

class Child:
    """A background process in its own process group, output to a log file."""

    # Every child not yet stopped: the main thread stops them all on a signal, whichever
    # mode's thread started them.
    running = set()
    lock = threading.Lock()

    def __init__(self, name, cmd, logfile):
        self.name, self.logfile = name, Path(logfile)
        log(f"starting {name}: {' '.join(shlex.quote(c) for c in cmd)}")
        log(f"  output -> {self.logfile}")
        self.out = open(self.logfile, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self.out.close()
            raise SetupError(f"cannot start {name}: {e}")
        with Child.lock:
            Child.running.add(self)

    @classmethod
    def stop_all(cls):
        with cls.lock:
            children = list(cls.running)
        for child in children:
            child.stop()

    def wait(self, timeout):
        """Wait for exit; return the exit code, or None on timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """Terminate the process group: SIGTERM, then SIGKILL after 5 s."""
        if self.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                if self.wait(grace) is not None:
                    break
            log(f"stopped {self.name}")
        self.out.close()
        with Child.lock:
            Child.running.discard(self)

    def tail(self, lines=20):
        try:
            text = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in text[-lines:]:
            print(f"    | {line}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, child, timeout):
    """Wait until 127.0.0.1:port accepts TCP connections (or the child dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            child.tail()
            raise SetupError(f"{child.name} exited with {child.proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    child.tail()
    raise SetupError(f"{child.name} did not listen on port {port} within {timeout}s")


# --- setup -------------------------------------------------------------------

def ensure_venv(venv):
    wstest = venv / "bin" / "wstest"
    if wstest.exists():
        log(f"using Autobahn from {venv}")
        return wstest
    log(f"{wstest} missing: creating the Autobahn virtualenv in {venv}")
    pyenv_root = os.environ.get("PYENV_ROOT")
    if not pyenv_root:
        try:
            pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                        check=True, timeout=30,
                                        stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pyenv_root = str(Path.home() / ".pyenv")
    py2 = Path(pyenv_root) / "versions" / "2.7.18" / "bin" / "python"
    if not py2.exists():
        raise SetupError(f"Python 2.7.18 not found at {py2} (install it with pyenv)")
    run_step([py2, "-m", "pip", "install", "virtualenv<20.22"], 600)
    run_step([py2, "-m", "virtualenv", venv], 600)
    run_step([venv / "bin" / "pip", "install", "autobahntestsuite"], 1200)
    if not wstest.exists():
        raise SetupError(f"installed autobahntestsuite but {wstest} is missing")
    return wstest


def build():
    # --bin is needed: with --example alone cargo would build only the example.
    run_step(["cargo", "build", "--release", "-p", "tether-cli", "-p", "tether",
              "--bin", "tether", "--example", "autobahn_client", "--example", "autobahn_h2"],
             3600, cwd=ROOT)


def split_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


# Autobahn's own expansion of the spec's case patterns (runs on Python 2.7).
EXPAND_CASES = """
import json, sys
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
from autobahntestsuite.caseset import CaseSet
cases = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(json.dumps(cases.parseSpecCases(json.load(open(sys.argv[1])))))
"""


def write_spec(args, tmp, spec):
    """Write the spec; return its path and how many cases it selects."""
    path = Path(tmp) / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    log(f"spec {path}: {json.dumps(spec)}")
    try:
        out = subprocess.run([str(args.venv / "bin" / "python"), "-c", EXPAND_CASES, str(path)],
                             capture_output=True, text=True, check=True, timeout=60,
                             stdin=subprocess.DEVNULL).stdout
        selected = len(json.loads(out))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise SetupError(f"could not expand the case patterns: {e}")
    if not selected:
        # wstest would wait forever with nothing to do
        raise SetupError("no Autobahn cases match --cases/--exclude")
    log(f"{selected} cases selected")
    return path, selected


def fresh_outdir(outdir):
    """Remove reports of a previous run so a stale index.json is never read."""
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)


def require(path):
    if not path.exists():
        raise SetupError(f"{path} does not exist (build it, or drop --no-build)")


# --- the two modes -----------------------------------------------------------

def run_server_mode(args, wstest, h2=False):
    outdir = args.reports / ("servers-h2" if h2 else "servers")
    fresh_outdir(outdir)
    port = free_port()
    if args.server_cmd:
        cmd = shlex.split(args.server_cmd.format(port=port))
    elif h2:
        binary = TARGET / "release" / "examples" / "autobahn_h2"
        require(binary)
        cmd = [str(binary), "server", str(port)]
    else:
        binary = TARGET / "release" / "tether"
        require(binary)
        cmd = [str(binary), "echo", "--host", "127.0.0.1", "--port", str(port),
               "--park-after", "100ms"]
    with tempfile.TemporaryDirectory(prefix="tether-autobahn-") as tmp:
        spec, selected = write_spec(args, tmp, {
            "outdir": str(outdir),
            "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}"}],
            "cases": args.cases,
            "exclude-cases": args.exclude,
            "exclude-agent-cases": {},
        })
        server = Child("server under test", cmd,
                       args.reports / ("server-h2.log" if h2 else "server.log"))
        fuzzer = None
        try:
            wait_for_port(port, server, args.start_timeout)
            fuzzer = Child("wstest fuzzingclient",
                           [str(wstest), "-m", "fuzzingclient", "-s", str(spec)],
                           args.reports / ("wstest-fuzzingclient-h2.log" if h2
                                           else "wstest-fuzzingclient.log"))
            code = fuzzer.wait(args.timeout)
            if code is None:
                raise SetupError(f"wstest fuzzingclient timed out after {args.timeout}s")
            if code != 0:
                fuzzer.tail()
                raise SetupError(f"wstest fuzzingclient exited with {code}")
            if server.proc.poll() is not None:
                log(f"warning: the server exited with {server.proc.returncode} during the run")
        finally:
            if fuzzer:
                fuzzer.stop()
            server.stop()
    return summarise("server-h2" if h2 else "server", outdir, selected)


def start_fuzzingserver(args, wstest, outdir, tmp, logname="wstest-fuzzingserver.log"):
    """Starts wstest's fuzzing server on a free port; returns (child, url, selected cases).

    The port is free when picked but may be taken before wstest binds it (by anything else
    on the machine opening sockets meanwhile): then another port is tried, up to three."""
    for attempt in range(1, 4):
        port = free_port()
        url = f"ws://127.0.0.1:{port}"
        spec, selected = write_spec(args, tmp, {
            "url": url,
            "outdir": str(outdir),
            "cases": args.cases,
            "exclude-cases": args.exclude,
            "exclude-agent-cases": {},
        })
        logfile = args.reports / logname
        # -u 0: no embedded web server (it would otherwise take port 8080)
        fuzzer = Child("wstest fuzzingserver",
                       [str(wstest), "-m", "fuzzingserver", "-s", str(spec), "-u", "0"],
                       logfile)
        try:
            wait_for_port(port, fuzzer, args.start_timeout)
            return fuzzer, port, url, selected
        except SetupError:
            fuzzer.stop()
            taken = "Address already in use" in logfile.read_text(errors="replace")
            if not taken or attempt == 3:
                raise
            log(f"port {port} was taken before wstest bound it: trying another")
    raise AssertionError("unreachable")


def run_client_mode(args, wstest, h2=False):
    outdir = args.reports / ("clients-h2" if h2 else "clients")
    fresh_outdir(outdir)
    example = TARGET / "release" / "examples" / ("autobahn_h2" if h2 else "autobahn_client")
    with tempfile.TemporaryDirectory(prefix="tether-autobahn-") as tmp:
        if not args.client_cmd:
            require(example)
        fuzzer, port, url, selected = start_fuzzingserver(
            args, wstest, outdir, tmp,
            "wstest-fuzzingserver-h2.log" if h2 else "wstest-fuzzingserver.log")
        if args.client_cmd:
            cmd = shlex.split(args.client_cmd.format(port=port, url=url))
        elif h2:
            cmd = [str(example), "client", url, AGENT]
        else:
            cmd = [str(example), url, AGENT]
        client = None
        try:
            client = Child("client under test", cmd,
                           args.reports / ("client-h2.log" if h2 else "client.log"))
            code = client.wait(args.timeout)
            if code is None:
                raise SetupError(f"the client timed out after {args.timeout}s")
            if code != 0:
                client.tail()
                log(f"warning: the client exited with {code}")
        finally:
            if client:
                client.stop()
            fuzzer.stop()
    return summarise("client-h2" if h2 else "client", outdir, selected)


# --- the report --------------------------------------------------------------

def case_key(case_id):
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]


def summarise(mode, outdir, selected):
    """Print the summary (in one piece: the other mode may be printing too); return True
    when every case passed."""
    out = []
    index = outdir / "index.json"
    if not index.exists():
        log(f"FAIL: no report at {index}")
        return False
    cases = json.loads(index.read_text()).get(AGENT, {})
    counts = {v: 0 for v in VERDICTS}
    for case in cases.values():
        counts[case["behavior"]] = counts.get(case["behavior"], 0) + 1
    tally = ", ".join(f"{k} {v}" for k, v in counts.items())
    out.append(f"\nAutobahn {mode} ({AGENT}): {len(cases)} cases — {tally}")
    bad = [c for c in sorted(cases, key=case_key) if cases[c]["behavior"] not in PASSING]
    for case_id in bad:
        case = cases[case_id]
        detail = {}
        try:
            detail = json.loads((outdir / case["reportfile"]).read_text())
        except (KeyError, OSError, ValueError):
            pass
        description = detail.get("description", "").split("<br>")[0].strip()
        out.append(f"  {case_id}: {case['behavior']} (close: {case['behaviorClose']}) — {description}")
        result, result_close = detail.get("result"), detail.get("resultClose")
        if result:
            out.append(f"      result: {result}")
        if result_close and result_close != result:
            out.append(f"      close:  {result_close}")
    out.append(f"Reports: {outdir / 'index.html'}\n")
    print("\n".join(out), flush=True)
    if len(cases) < selected:
        log(f"FAIL: only {len(cases)} of the {selected} selected cases have results")
        return False
    return not bad


# --- main --------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description="Run the Autobahn TestSuite against tether.")
    p.add_argument("mode", choices=["server", "client", "all", "server-h2", "client-h2", "h2"])
    p.add_argument("--cases", default="*", help="comma-separated case patterns (default '*')")
    p.add_argument("--exclude", default="", help="comma-separated case patterns to skip, e.g. '12.*,13.*'")
    p.add_argument("--venv", type=Path, default=ROOT / "target" / "autobahn-venv",
                   help="Autobahn virtualenv (created when bin/wstest is missing)")
    p.add_argument("--reports", type=Path, default=ROOT / "target" / "autobahn-reports",
                   help="report directory (servers/, clients/ and their -h2 twins are replaced each run)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build")
    p.add_argument("--timeout", type=int, default=1800,
                   help="seconds allowed for one mode's test run (default 1800)")
    p.add_argument("--start-timeout", type=int, default=30,
                   help="seconds to wait for a listener to come up (default 30)")
    # For testing this script without tether: '{port}' / '{url}' are substituted.
    p.add_argument("--server-cmd", help=argparse.SUPPRESS)
    p.add_argument("--client-cmd", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.cases = split_list(args.cases)
    args.exclude = split_list(args.exclude)
    args.venv = args.venv.resolve()
    args.reports = args.reports.resolve()
    return args


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        wstest = ensure_venv(args.venv)
        if not args.no_build:
            build()
    except SetupError as e:
        log(f"ERROR: {e}")
        return 2
    args.reports.mkdir(parents=True, exist_ok=True)
    modes = {"all": ["server", "client"], "h2": ["server-h2", "client-h2"]}.get(
        args.mode, [args.mode])
    results = {}

    def run_mode(mode):
        run = run_server_mode if mode.startswith("server") else run_client_mode
        started = time.monotonic()
        try:
            results[mode] = "PASS" if run(args, wstest, h2=mode.endswith("-h2")) else "FAIL"
        except SetupError as e:
            log(f"ERROR ({mode}): {e}")
            results[mode] = "ERROR"
        except Exception as e:  # a bug here must not leave the other mode's children behind
            log(f"ERROR ({mode}): {type(e).__name__}: {e}")
            results[mode] = "ERROR"
        log(f"{mode} mode took {time.monotonic() - started:.0f} s")

    # The two modes run at once: each is one wstest process (single-threaded Python 2) and
    # one tether process, so side by side they use both cores and take about as long as
    # the slower one alone, not the sum.
    threads = [threading.Thread(target=run_mode, args=(mode,), daemon=True) for mode in modes]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            # A timed join leaves the main thread free to take SIGTERM / Ctrl-C.
            while thread.is_alive():
                thread.join(1)
    finally:
        Child.stop_all()
    for mode in modes:
        log(f"{mode}: {results.get(mode, 'ERROR')}")
    results = {mode: results.get(mode, "ERROR") for mode in modes}
    if "ERROR" in results.values():
        return 2
    return 1 if "FAIL" in results.values() else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # children were already stopped by the finally blocks
        log("interrupted")
        sys.exit(130)
