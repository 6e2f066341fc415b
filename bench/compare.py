#!/usr/bin/env python3
"""Compare `tether echo` with other echo servers and write docs/benchmarks.md (issue #4).

    python3 bench/compare.py                      # everything: ~14 minutes on 2 cores
    python3 bench/compare.py --duration 2 --runs 1 --only a,b --servers tether,fastwebsockets

It builds what it needs (release tether-cli; the peer servers in bench/, a cargo workspace of
their own, into target/bench; a venv with Python `websockets` in target/bench-venv), then for
each run, for each scenario, starts each server in turn pinned to CPU 0 (`taskset -c 0`) and
drives it with `tether bench` pinned to CPU 1 (`taskset -c 1`, one tokio worker). Every server
is started fresh for every measurement and killed afterwards, also on Ctrl-C or an error.
The medians and min–max spreads over the runs go to docs/benchmarks.md and a chart of the
ratios to docs/benchmarks.svg.

On a machine shared with other work it holds an flock (default /tmp/tether-cargo.lock when
that file exists, or --lock FILE) from the first build to the last measurement, so cargo runs
that honour the same lock wait instead of competing for the two CPUs.
"""

import argparse
import datetime
import fcntl
import json
import math
import os
import platform
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_TARGET = ROOT / "target" / "bench"
VENV = ROOT / "target" / "bench-venv"
TETHER = ROOT / "target" / "release" / "tether"
# The binary whose `tether bench` drives the load: TETHER unless --load names another, so that
# two server builds can be measured with the same load generator.
LOAD = None
SERVER_CPU, LOAD_CPU = "0", "1"
# docs/benchmarks.md's fan-out section is bench/fanout.py's: kept when this rewrites the file.
FANOUT_BEGIN = "<!-- fanout: written by bench/fanout.py -->"
FANOUT_END = "<!-- /fanout -->"

# name -> how to start it; `raw` servers are driven with `tether bench --raw`.
SERVERS = {
    "tether": {
        "label": "tether",
        "cmd": [str(TETHER), "echo", "--port", "0", "--threads", "1"],
    },
    "fastwebsockets": {
        "label": "fastwebsockets",
        "cmd": [str(BENCH_TARGET / "release" / "fastwebsockets-echo"), "--port", "0"],
    },
    "tungstenite": {
        "label": "tokio-tungstenite",
        "cmd": [str(BENCH_TARGET / "release" / "tungstenite-echo"), "--port", "0"],
    },
    "python": {
        "label": "Python websockets",
        "cmd": [str(VENV / "bin" / "python"), str(ROOT / "bench" / "python_echo.py"), "--port", "0"],
    },
    "tcp": {
        "label": "plain TCP echo",
        "cmd": [str(BENCH_TARGET / "release" / "tcp-echo"), "--port", "0"],
        "raw": True,
    },
    # uWebSockets (C++), built from its sources outside this repository (--uws names where;
    # see that folder's README). It takes a port, not 0: a free one is picked for it.
    "uws": {
        "label": "uWebSockets (C++)",
        "cmd": ["{uws}/uws-echo", "{port}"],
    },
}

# Where the uWebSockets binaries are (--uws); the default is the workplace's shared peers.
UWS = [ROOT.parent / "shared" / "peers" / "uws"]

# Each scenario: what the load does, which servers take part, and which one ratios are taken to.
SCENARIOS = {
    "a": {
        "title": "100 conns, 20 B text, pipeline 1",
        "echo": dict(conns=100, size=20, pipeline=1),
        "servers": ["tether", "uws", "fastwebsockets", "tungstenite", "tcp"],
        "baseline": "fastwebsockets",
    },
    "b": {
        "title": "100 conns, 20 B text, pipeline 32",
        "echo": dict(conns=100, size=20, pipeline=32),
        "servers": ["tether", "uws", "fastwebsockets", "tungstenite", "tcp"],
        "baseline": "fastwebsockets",
    },
    "c": {
        "title": "10 conns, 64 KiB binary, pipeline 4",
        "echo": dict(conns=10, size=64 << 10, pipeline=4, binary=True),
        "servers": ["tether", "uws", "fastwebsockets", "tungstenite", "tcp"],
        "baseline": "fastwebsockets",
    },
    "d": {
        "title": "10 conns, 1 MiB binary, pipeline 2",
        "echo": dict(conns=10, size=1 << 20, pipeline=2, binary=True),
        "servers": ["tether", "uws", "fastwebsockets", "tungstenite", "tcp"],
        "baseline": "fastwebsockets",
    },
    "e": {
        "title": "server RSS per idle connection, {idle_conns:,} connections",
        "idle": True,
        "servers": ["tether", "uws", "fastwebsockets", "tungstenite", "tcp"],
        "baseline": "fastwebsockets",
    },
    "f": {
        "title": "permessage-deflate, 100 conns, 1 KiB JSON-like text, pipeline 8",
        "echo": dict(conns=100, size=1024, pipeline=8, deflate=True),
        "servers": ["tether", "python", "tcp"],
        "baseline": "python",
    },
}

# (scenario, what is compared, target, description)
TARGETS = [
    ("a", "baseline", 1.2, "tether ≥ 1.2× fastwebsockets"),
    ("b", "baseline", 5.0, "tether ≥ 5× fastwebsockets"),
    ("b", "tcp", 0.9, "tether ≥ 0.9× plain TCP echo"),
    ("c", "baseline", 2.2, "tether ≥ 2.2× fastwebsockets"),
    ("c", "tcp", 0.9, "tether ≥ 0.9× plain TCP echo"),
    ("d", "baseline", 1.0, "tether ≥ 1.0× fastwebsockets"),
    ("d", "tcp", 0.9, "tether ≥ 0.9× plain TCP echo"),
    ("e", "bytes", 1024, "tether ≤ 1 KiB per idle connection"),
    ("b", "uws", 1.0, "tether ≥ 1.0× uWebSockets (issue 32)"),
    ("c", "uws", 1.0, "tether ≥ 1.0× uWebSockets (issue 32)"),
    ("d", "uws", 1.0, "tether ≥ 1.0× uWebSockets (issue 32)"),
    ("e", "bytes", 400, "tether ≤ 400 B per idle connection (issue 32)"),
    ("f", "baseline", 2.0, "tether ≥ 2× Python websockets"),
]

LIVE = {}  # pid -> Popen: every process we started and have not reaped yet


# ---------------------------------------------------------------------------------------------
# processes


def spawn(cmd, cpu, **kw):
    """Starts `cmd` pinned to `cpu`, in a session of its own so it can be killed as a group."""
    proc = subprocess.Popen(["taskset", "-c", cpu, *cmd], start_new_session=True, **kw)
    LIVE[proc.pid] = proc
    return proc


def stop(proc, grace=3.0):
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    LIVE.pop(proc.pid, None)


def stop_all():
    for proc in list(LIVE.values()):
        stop(proc, grace=1.0)


def free_port():
    """A loopback port nothing listens on now (for a server that cannot take 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name):
    """Starts a server and returns (process, url) once it printed its listening line."""
    cmd = [a.format(port=free_port(), uws=UWS[0]) if "{" in a else a
           for a in SERVERS[name]["cmd"]]
    proc = spawn(cmd, SERVER_CPU, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            stop(proc)
            raise RuntimeError(f"{name} did not print its address")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                continue
            line += chunk
    text = line.decode().strip()
    if "listening on " not in text:
        stop(proc)
        raise RuntimeError(f"{name} printed {text!r}")
    address = text.split("listening on ", 1)[1]
    if "://" not in address:
        address = f"ws://{address}/"
    return proc, address


def cpu_seconds(pid):
    """utime + stime of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds():
    """CPU seconds all processes spent (user, nice, system, irq, softirq), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def load_env():
    """The load generator gets one tokio worker: it has one CPU."""
    return dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG="warn")


def run_load(args):
    """Runs `tether bench ARGS --json` on the load CPU; returns (summary, wall seconds)."""
    started = time.monotonic()
    proc = spawn([str(LOAD or TETHER), "bench", *args, "--json"], LOAD_CPU, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=load_env())
    out, err = proc.communicate()
    wall = time.monotonic() - started
    LIVE.pop(proc.pid, None)
    # Exit 1 with a summary: the run happened and had errors, which the summary counts.
    if proc.returncode != 0 and not (proc.returncode == 1 and out.strip()):
        raise RuntimeError(f"tether bench {' '.join(args)}: {err.decode().strip()}")
    return json.loads(out), wall


# ---------------------------------------------------------------------------------------------
# one measurement


def measure_echo(name, scenario, duration):
    spec = SCENARIOS[scenario]["echo"]
    server, url = start_server(name)
    try:
        load = ["echo", url, "--conns", str(spec["conns"]), "--size", str(spec["size"]),
                "--pipeline", str(spec["pipeline"]), "--duration", str(duration), "--quiet"]
        if SERVERS[name].get("raw"):
            load.append("--raw")
        elif spec.get("deflate"):
            load.append("--deflate")
        else:
            # Pre-encoded frames after a real handshake, every echo compared byte for byte:
            # the cheapest correct client, so the one load core hides as little as it can.
            load.append("--prebuilt")
        if spec.get("binary"):
            load.append("--binary")
        cpu_before, machine_before = cpu_seconds(server.pid), machine_cpu_seconds()
        t0 = time.monotonic()
        ru_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary, wall = run_load(load)
        ru_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        elapsed = time.monotonic() - t0
        server_seconds = cpu_seconds(server.pid) - cpu_before
        load_seconds = ((ru_after.ru_utime + ru_after.ru_stime)
                        - (ru_before.ru_utime + ru_before.ru_stime))
        # Whatever else ran on the machine meanwhile (in CPUs' worth), so a run disturbed by
        # other work can be told apart and redone.
        other = (machine_cpu_seconds() - machine_before - server_seconds - load_seconds) / elapsed
    finally:
        stop(server)
    return {
        "value": summary["messages_per_sec"],
        "mb_per_sec": summary["mb_per_sec"],
        "p50_us": summary["p50_us"],
        "p99_us": summary["p99_us"],
        "errors": summary["errors"],
        "connections": summary["connections"],
        "server_cpu": server_seconds / elapsed,
        "load_cpu": load_seconds / wall,
        "other_cpu": max(other, 0.0),
    }


def measure_idle(name, conns, hold):
    """Server RSS before, at its peak while `tether bench idle` holds `conns` connections, and
    once they have been held for `hold` seconds (the figure: what an idle connection keeps
    once the handshakes' memory is given back and quiet connections are set aside)."""
    server, url = start_server(name)
    try:
        time.sleep(0.5)
        before = rss_kib(server.pid)
        load = ["idle", url, "--conns", str(conns), "--hold", str(hold)]
        if SERVERS[name].get("raw"):
            load.append("--raw")
        started = time.monotonic()
        proc = spawn([str(LOAD or TETHER), "bench", *load, "--json"], LOAD_CPU, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=load_env())
        peak = settled = before
        while proc.poll() is None:
            time.sleep(0.25)
            now = rss_kib(server.pid)
            peak = max(peak, now)
            # The hold starts once every connection is open, so until `hold` has passed
            # since the start (less a margin) they are all still held.
            if time.monotonic() - started <= hold - 0.5:
                settled = now
        out, err = proc.communicate()
        LIVE.pop(proc.pid, None)
        if proc.returncode != 0 and not (proc.returncode == 1 and out.strip()):
            raise RuntimeError(f"tether bench idle: {err.decode().strip()}")
        held = json.loads(out)["held"]
    finally:
        stop(server)
    return {
        "value": (settled - before) * 1024 / max(held, 1),
        "peak_per_connection": (peak - before) * 1024 / max(held, 1),
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "rss_settled_kib": settled,
        "held": held,
        "errors": conns - held,
    }


WAIT_LEFT = [0.0]  # seconds still to spend waiting for a quiet machine, over the whole run


def wait_for_quiet(limit):
    """Waits until other work uses at most `limit` CPUs over half a second, or the run's
    waiting budget (--max-wait) is spent; returns whether the machine is quiet."""
    told = False
    while True:
        before = machine_cpu_seconds()
        time.sleep(0.5)
        busy = (machine_cpu_seconds() - before) / 0.5
        if busy <= limit:
            return True
        WAIT_LEFT[0] -= 0.5
        if WAIT_LEFT[0] <= 0:
            return False
        if not told:
            print(f"(machine busy: {busy:.1f} CPUs; waiting) ", end="", file=sys.stderr,
                  flush=True)
            told = True


def measure(name, scenario, opts):
    """One measurement, redone (up to --retries times) when other work disturbed it."""
    for attempt in range(opts.retries + 1):
        quiet = wait_for_quiet(opts.max_other)
        try:
            if SCENARIOS[scenario].get("idle"):
                result = measure_idle(name, opts.idle_conns, opts.idle_hold)
                print(f"{result['value']:,.0f} B/conn, {result['held']} held", file=sys.stderr)
                return result
            result = measure_echo(name, scenario, opts.duration)
        except RuntimeError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return None
        print(f"{result['value']:,.0f} msg/s, errors {result['errors']}, server CPU "
              f"{result['server_cpu'] * 100:.0f}%, load CPU {result['load_cpu'] * 100:.0f}%, "
              f"other CPU {result['other_cpu'] * 100:.0f}%", end="", file=sys.stderr)
        if result["other_cpu"] <= opts.max_other or attempt == opts.retries or not quiet:
            print(file=sys.stderr, flush=True)
            return result
        print(" — disturbed by other work, again: ", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# building


def build(servers, log, tether):
    def sh(cmd, **kw):
        print("+", " ".join(cmd), file=log, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, **kw)

    if tether:
        sh(["cargo", "build", "--release", "--quiet", "-p", "tether-cli"])
    if {"fastwebsockets", "tungstenite", "tcp"} & set(servers):
        sh(["cargo", "build", "--release", "--quiet", "--manifest-path",
            str(ROOT / "bench" / "Cargo.toml")],
           env=dict(os.environ, CARGO_TARGET_DIR=str(BENCH_TARGET)))
    if "python" in servers:
        if not (VENV / "bin" / "python").exists():
            sh([sys.executable, "-m", "venv", str(VENV)])
        probe = subprocess.run([str(VENV / "bin" / "python"), "-c", "import websockets"],
                               capture_output=True)
        if probe.returncode != 0:
            sh([str(VENV / "bin" / "pip"), "install", "--quiet", "websockets"])


# ---------------------------------------------------------------------------------------------
# facts for the report


def machine_facts():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def locked(lock, *names):
        text = lock.read_text() if lock.exists() else ""
        found = {}
        for block in text.split("[[package]]"):
            name = re.search(r'^name = "(.+)"', block, re.M)
            version = re.search(r'^version = "(.+)"', block, re.M)
            if name and version and name.group(1) in names:
                found.setdefault(name.group(1), version.group(1))
        return found

    peers = locked(ROOT / "bench" / "Cargo.lock", "tokio-tungstenite", "tungstenite",
                   "fastwebsockets", "hyper", "tokio")
    ours = locked(ROOT / "Cargo.lock", "tokio")

    def output(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    websockets = output([str(VENV / "bin" / "python"), "-c",
                         "import websockets; print(websockets.__version__)"])
    python = output([str(VENV / "bin" / "python"), "--version"]) or platform.python_version()
    commit = output(["git", "rev-parse", "--short", "HEAD"])
    dirty = output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "rustc": output(["rustc", "--version"]),
        "tether": output([str(TETHER), "--version"]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "peers": peers,
        "tokio_tether": ours.get("tokio", "?"),
        "websockets": websockets or "not installed",
        "python": python,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------------
# summarising and writing


def summarise(samples):
    """Median and spread of each (scenario, server) over the runs that succeeded."""
    out = {}
    for key, runs in samples.items():
        ok = [r for r in runs if r is not None]
        if not ok:
            out[key] = None
            continue
        values = [r["value"] for r in ok]
        row = {"value": statistics.median(values), "min": min(values), "max": max(values),
               "runs": len(ok), "failed": len(runs) - len(ok),
               "errors": sum(r["errors"] for r in ok)}
        for field in ("mb_per_sec", "p50_us", "p99_us", "server_cpu", "load_cpu", "other_cpu",
                      "held", "rss_before_kib", "rss_peak_kib", "rss_settled_kib",
                      "peak_per_connection"):
            if field in ok[0]:
                row[field] = statistics.median(r[field] for r in ok)
        if "server_cpu" in ok[0]:
            row["per_cpu"] = statistics.median(r["value"] / max(r["server_cpu"], 1e-9) for r in ok)
        out[key] = row
    return out


def ratio(summary, scenario, server, other):
    """How much better `server` did than `other`: throughput ratio, or inverse for memory."""
    a, b = summary.get((scenario, server)), summary.get((scenario, other))
    if not a or not b or not a["value"] or not b["value"]:
        return None
    if SCENARIOS[scenario].get("idle"):
        return b["value"] / a["value"]
    return a["value"] / b["value"]


def fmt_rate(v):
    return f"{v:,.0f}"


def fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}×"


def limit(row):
    """Which side was saturated: a CPU at 90% or more of the wall time."""
    server, load = row["server_cpu"] >= 0.9, row["load_cpu"] >= 0.9
    return {(True, True): "both", (True, False): "server", (False, True): "load",
            (False, False): "neither"}[(server, load)]


def spread(row):
    if row["value"] == 0:
        return "–"
    lo = (row["min"] / row["value"] - 1) * 100
    hi = (row["max"] / row["value"] - 1) * 100
    return f"{lo:+.1f}% / {hi:+.1f}%"


def target_results(summary):
    rows = []
    for scenario, kind, goal, text in TARGETS:
        if (scenario, "tether") not in summary:
            continue
        tether = summary[(scenario, "tether")]
        limits, ceiling, per_cpu = "", None, None
        if kind == "bytes":
            actual = None if tether is None else tether["value"]
            met = actual is not None and actual <= goal
            shown = "–" if actual is None else f"{actual:,.0f} B"
        else:
            other = SCENARIOS[scenario]["baseline"] if kind == "baseline" else kind
            actual = ratio(summary, scenario, "tether", other)
            met = actual is not None and actual >= goal
            shown = fmt_ratio(actual)
            if actual is not None:
                limits = f"{limit(tether)} / {limit(summary[(scenario, other)])}"
                per_cpu = per_cpu_ratio(summary, scenario, "tether", other)
            if kind == "baseline" and summary.get((scenario, "tcp")):
                ceiling = ratio(summary, scenario, "tcp", other)
        rows.append((scenario, text, shown, met if actual is not None else None, limits,
                     ceiling, per_cpu))
    return rows


def per_cpu_ratio(summary, scenario, a, b):
    """How many more messages `a` echoed than `b` per second of server CPU."""
    ra, rb = summary.get((scenario, a)), summary.get((scenario, b))
    if not ra or not rb or not ra.get("per_cpu") or not rb.get("per_cpu"):
        return None
    return ra["per_cpu"] / rb["per_cpu"]


def svg_chart(summary, scenarios):
    """Grouped bars, log scale: each server's ratio to the scenario's baseline."""
    groups = []
    for s in scenarios:
        bars = [(name, ratio(summary, s, name, SCENARIOS[s]["baseline"]))
                for name in SCENARIOS[s]["servers"] if summary.get((s, name))]
        bars = [(n, r) for n, r in bars if r]
        if bars:
            groups.append((s, bars))
    colours = {"tether": "#d95f02", "fastwebsockets": "#1b9e77", "tungstenite": "#7570b3",
               "python": "#e7298a", "tcp": "#999999", "uws": "#e6ab02"}
    width, height = 860, 420
    left, right, top, bottom = 60, 20, 50, 90
    plot_h = height - top - bottom
    ratios = [r for _, bars in groups for _, r in bars] or [1]
    lo = 2.0 ** math.floor(math.log2(min(min(ratios), 1) * 0.9))
    hi = 2.0 ** math.ceil(math.log2(max(max(ratios), 1) * 1.1))

    def y(r):
        return top + plot_h * (1 - (math.log2(r) - math.log2(lo)) / (math.log2(hi) - math.log2(lo)))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">Ratio to the '
           'baseline (fastwebsockets; Python websockets in f), log scale, higher is better</text>',
           f'<text x="{width / 2}" y="37" text-anchor="middle" fill="#555">throughput: '
           'messages/s ÷ baseline; (e): baseline bytes per idle connection ÷ own</text>']
    tick = lo
    while tick <= hi * 1.0001:
        ty = y(tick)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{ty:.1f}" y2="{ty:.1f}" '
                   f'stroke="{"#444" if tick == 1 else "#ddd"}"/>')
        label = f"{tick:g}×" if tick >= 1 else f"1/{round(1 / tick)}×"
        out.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{label}</text>')
        tick *= 2
    slot = (width - left - right) / max(len(groups), 1)
    for gi, (s, bars) in enumerate(groups):
        bar_w = min(28, (slot - 20) / len(bars))
        x0 = left + gi * slot + (slot - bar_w * len(bars)) / 2
        for bi, (name, r) in enumerate(bars):
            x = x0 + bi * bar_w
            top_y, base_y = y(max(r, lo)), y(1)
            y1, y2 = min(top_y, base_y), max(top_y, base_y)
            out.append(f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bar_w - 2:.1f}" '
                       f'height="{max(y2 - y1, 1):.1f}" fill="{colours[name]}">'
                       f'<title>{SERVERS[name]["label"]}: {r:.2f}×</title></rect>')
            ly = top_y - 4 if r >= 1 else top_y + 12
            out.append(f'<text x="{x + bar_w / 2 - 1:.1f}" y="{ly:.1f}" text-anchor="middle" '
                       f'font-size="10">{r:.2g}</text>')
        for sc, kind, goal, _ in TARGETS:
            if sc == s and kind == "baseline":
                ty = y(goal)
                out.append(f'<line x1="{x0 - 4:.1f}" x2="{x0 + bar_w * len(bars) + 2:.1f}" '
                           f'y1="{ty:.1f}" y2="{ty:.1f}" stroke="red" stroke-dasharray="4 3"/>')
        cx = left + gi * slot + slot / 2
        out.append(f'<text x="{cx:.1f}" y="{height - bottom + 18}" text-anchor="middle" '
                   f'font-weight="bold">({s})</text>')
        short = {"a": "20 B, p1", "b": "20 B, p32", "c": "64 KiB, p4", "d": "1 MiB, p2",
                 "e": "idle memory", "f": "deflate 1 KiB"}[s]
        out.append(f'<text x="{cx:.1f}" y="{height - bottom + 33}" text-anchor="middle">'
                   f'{short}</text>')
    lx = left
    for name in ["tether", "uws", "fastwebsockets", "tungstenite", "python", "tcp"]:
        if any(n == name for _, bars in groups for n, _ in bars):
            out.append(f'<rect x="{lx}" y="{height - 30}" width="12" height="12" '
                       f'fill="{colours[name]}"/>')
            out.append(f'<text x="{lx + 16}" y="{height - 20}">{SERVERS[name]["label"]}</text>')
            lx += 40 + 7 * len(SERVERS[name]["label"])
    out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{height - 24}" y2="{height - 24}" '
               'stroke="red" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{lx + 22}" y="{height - 20}">tether target</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# The options a report describes, saved with the raw results.
REPORT_OPTS = ("runs", "duration", "idle_conns", "idle_hold", "retries", "max_other", "max_wait")
RESULTS = BENCH_TARGET / "compare-results.json"


def report(results, out):
    """Writes the report and chart from a run's raw results, and prints the verdicts."""
    samples = {(x["scenario"], x["server"]): x["runs"] for x in results["samples"]}
    summary = summarise(samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    svg = write_report(out, summary, results["scenarios"], results["facts"],
                       argparse.Namespace(**results["opts"]), results["command"],
                       results["elapsed"])
    print(f"wrote {out} and {svg}", file=sys.stderr)
    for scenario, text, shown, met, *_ in target_results(summary):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[met]
        print(f"  ({scenario}) {text}: {shown} — {verdict}", file=sys.stderr)


def write_report(path, summary, scenarios, facts, opts, command, elapsed):
    svg_path = path.with_suffix(".svg")
    svg_path.write_text(svg_chart(summary, scenarios))
    L = []
    L.append("# Benchmarks: tether beside other WebSocket servers\n")
    L.append("Generated by `bench/compare.py` (issue #4); do not edit by hand. To regenerate:\n")
    L.append("```sh\npython3 bench/compare.py\n```\n")
    L.append(f"This file came from `{command}` ({opts.runs} run(s), {opts.duration:g} s per "
             f"throughput case, {opts.idle_conns:,} idle connections for (e)), which took "
             f"{elapsed / 60:.1f} minutes on {facts['date']}.\n")
    L.append("## Machine\n")
    peers = facts["peers"]
    L.append(f"- {facts['nproc']} CPUs: {facts['cpu']}; Linux {facts['kernel']}")
    L.append(f"- {facts['rustc']}; {facts['tether']} at {facts['commit']}, tokio "
             f"{facts['tokio_tether']}")
    L.append(f"- peers (bench/Cargo.lock): tokio-tungstenite {peers.get('tokio-tungstenite', '?')} "
             f"(tungstenite {peers.get('tungstenite', '?')}), fastwebsockets "
             f"{peers.get('fastwebsockets', '?')} (hyper {peers.get('hyper', '?')}), tokio "
             f"{peers.get('tokio', '?')}")
    L.append(f"- Python websockets {facts['websockets']} on {facts['python']}\n")
    L.append("## Method\n")
    L.append(
        "- Servers: `tether echo --threads 1`; uWebSockets (C++), its echo server built from "
        "its sources (`uws-echo`: one event loop, compression off; where and how it was built "
        "is in the README beside the binary, `--uws`); `bench/src/bin/fastwebsockets-echo.rs` and "
        "`tungstenite-echo.rs`, each library's documented echo example (fastwebsockets: hyper "
        "upgrade + `FragmentCollector`, auto-pong/close on; tokio-tungstenite: `accept_async` "
        "and `read.forward(write)`); `bench/src/bin/tcp-echo.rs`, a plain TCP echo, the "
        "ceiling; `bench/python_echo.py`, Python `websockets`' asyncio echo with "
        "permessage-deflate. Every Rust server runs a tokio multi-thread runtime with exactly "
        "one worker thread (what `tether echo --threads 1` does) and sets TCP_NODELAY; the "
        "peers use the system allocator, the `tether` binary links jemalloc "
        "(docs/decisions.md, 14); the peers are built with the same release profile as "
        "tether.\n"
        "- Pinning: the server runs under `taskset -c 0`, the load generator (`tether bench`, "
        "one tokio worker via `TOKIO_WORKER_THREADS=1`) under `taskset -c 1`; loopback TCP.\n"
        "- Order: for each run, for each scenario, each server in turn (the starting server "
        "rotates between runs); every measurement starts a fresh server and kills it "
        "afterwards. The tables give the median over the runs and the spread of the other "
        "runs around it (min / max, relative to the median).\n"
        "- Throughput (a–d, f): `tether bench echo` connects every connection first, then "
        "each keeps `pipeline` messages in flight for the duration and checks every echo byte "
        "for byte; the value is verified echoes per second. In (a)–(d) it runs with "
        "`--prebuilt`: after a real opening handshake (the accept key checked) it writes "
        "pre-encoded masked frames and compares each echo with the exact unmasked frame the "
        "server must send back, the cheapest correct client. Against the plain TCP echo it "
        "runs with `--raw`: no handshake, the same masked frames, expected back unchanged, "
        "with the same accounting: the TCP row is the ceiling of the server side and kernel. "
        "(f) uses the full tether client, which compresses and decompresses.\n"
        "- Memory (e): the server's VmRSS before, and once "
        f"`tether bench idle --conns {opts.idle_conns}` has held its connections for "
        f"{opts.idle_hold:g} s (`--raw` against the TCP echo), divided by the connections "
        "held: what an idle connection keeps once the memory of the handshakes is given back "
        "(jemalloc returns it over about 10 s) and, in `tether echo`, once quiet connections "
        "are set aside (after 2 s, `--park-after`). The peak while they open (sampled every "
        "0.25 s) is beside it. Kernel socket buffers are not in RSS.\n"
        "- (f): the client offers permessage-deflate and sends 1 KiB of JSON-like text; "
        "fastwebsockets and tokio-tungstenite do not implement permessage-deflate and sit "
        "this one out; the TCP row echoes the same 1 KiB uncompressed, for scale only.\n"
        "- CPU columns: the server's CPU time over the load's lifetime, and the load "
        "generator's (medians over the runs). *limit* names the side at 90% or more: "
        "`server` is what this harness wants to see; `load` means the load generator (one "
        "core, verifying every byte) was the bottleneck and the number is a floor for that "
        "server, so ratios between servers are compressed towards 1; `neither` means the "
        "round trip itself (pipeline 1) or other work on the machine held both back. "
        "*other CPU* is what every other process used meanwhile (from /proc/stat, in % of "
        f"one CPU); each measurement first waits for a quiet machine and is redone up to "
        f"{opts.retries} times when that exceeds {opts.max_other * 100:.0f}% (the whole run "
        f"waits at most {opts.max_wait:g} s; after that it measures anyway, and this column "
        "shows it).\n"
        "- With two CPUs the load generator has one core, and it does more work per message "
        "than an echo server (it masks, parses, and compares every byte): where a fast "
        "server meets it, *limit* says `load`, and that server's lead is understated. "
        "*per server CPU-second* (messages/s ÷ server CPU, median of the runs) is then the "
        "fairer view of the server's own efficiency; the targets below are judged on "
        "messages/s all the same, as the issue states them.\n"
        "- The raw results of the last run are kept in "
        f"`{RESULTS.relative_to(ROOT)}`; `--render` rewrites this file from them.\n")
    L.append("## Results\n")
    L.append(f"![ratios to the baseline]({svg_path.name})\n")
    for s in scenarios:
        spec = SCENARIOS[s]
        L.append(f"### ({s}) {spec['title'].format(idle_conns=opts.idle_conns)}\n")
        base_label = SERVERS[spec["baseline"]]["label"]
        if spec.get("idle"):
            L.append(f"| server | bytes per idle connection | spread | peak per connection | "
                     f"RSS before → peak → held | held | vs {base_label} (less is better) | "
                     f"vs uWebSockets |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        else:
            L.append(f"| server | messages/s | spread | MB/s | p50 / p99 µs | server CPU | "
                     f"load CPU | other CPU | limit | per server CPU-second | "
                     f"vs {base_label} | vs uWebSockets | vs TCP echo |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
        for name in spec["servers"]:
            if (s, name) not in summary:
                continue
            row = summary[(s, name)]
            label = SERVERS[name]["label"]
            if name == "tether":
                label = "**tether**"
            if row is None:
                L.append(f"| {label} | failed |" + " |" * 11)
                continue
            note = ""
            if row["failed"]:
                note += f" ({row['failed']} run(s) failed)"
            if row["errors"]:
                note += f" ({row['errors']} errors)"
            if spec.get("idle"):
                L.append(f"| {label} | {row['value']:,.0f}{note} | {spread(row)} | "
                         f"{row['peak_per_connection']:,.0f} | "
                         f"{row['rss_before_kib']:,.0f} → {row['rss_peak_kib']:,.0f} → "
                         f"{row['rss_settled_kib']:,.0f} KiB | "
                         f"{row['held']:,.0f} | "
                         f"{fmt_ratio(ratio(summary, s, name, spec['baseline']))} | "
                         f"{fmt_ratio(ratio(summary, s, name, 'uws'))} |")
            else:
                tcp = ratio(summary, s, name, "tcp") if name != "tcp" else None
                L.append(f"| {label} | {fmt_rate(row['value'])}{note} | {spread(row)} | "
                         f"{row['mb_per_sec']:,.1f} | {row['p50_us']:,.0f} / "
                         f"{row['p99_us']:,.0f} | {row['server_cpu'] * 100:.0f}% | "
                         f"{row['load_cpu'] * 100:.0f}% | {row['other_cpu'] * 100:.0f}% | "
                         f"{limit(row)} | {fmt_rate(row['per_cpu'])} | "
                         f"{fmt_ratio(ratio(summary, s, name, spec['baseline']))} | "
                         f"{fmt_ratio(ratio(summary, s, name, 'uws'))} | "
                         f"{fmt_ratio(tcp)} |")
        L.append("")
    L.append("## Targets\n")
    L.append("| scenario | target | measured | | limit (tether / other) | "
             "per server CPU-second | plain TCP echo, same ratio |")
    L.append("|---|---|---:|---|---|---:|---:|")
    above = []
    for scenario, text, shown, met, limits, ceiling, per_cpu in target_results(summary):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[met]
        L.append(f"| ({scenario}) | {text} | {shown} | {verdict} | {limits} | "
                 f"{fmt_ratio(per_cpu)} | {fmt_ratio(ceiling)} |")
        goal = next(g for sc, _, g, t in TARGETS if sc == scenario and t == text)
        if met is False and ceiling is not None and ceiling < goal:
            above.append(f"({scenario}) {text}: the plain TCP echo itself reached "
                         f"{fmt_ratio(ceiling)}")
    L.append("\nA ratio whose *limit* says `load` for tether is a floor: the load generator, "
             "not tether, ran out of CPU. *Per server CPU-second* compares the same two servers "
             "by messages per second of their own CPU, which the load generator's limit does "
             "not cap. The last column is the plain TCP echo's ratio to the same baseline. For small "
             "and medium messages it is the ceiling: a WebSocket server moves the same bytes "
             "through the same kernel and does more work besides. (With 1 MiB messages tether "
             "reads a whole frame at once and can beat the echo's 64 KiB read-write loop.)\n")
    if above:
        L.append("In this run these targets lay above the ceiling, so no WebSocket server could "
                 "have met them on this machine: " + "; ".join(above) + ".\n")
    L.append("## The load generator's own capacity\n")
    lines = []
    for s in scenarios:
        t, c = summary.get((s, "tether")), summary.get((s, "tcp"))
        if SCENARIOS[s].get("idle") or not t or not c:
            continue
        lines.append(f"- ({s}) the same client process drove the TCP echo at "
                     f"{fmt_rate(c['value'])} msg/s ({c['value'] / t['value']:.2f}× tether's "
                     f"rate) with the load CPU at {c['load_cpu'] * 100:.0f}%; against tether "
                     f"the load CPU was {t['load_cpu'] * 100:.0f}% and the server's "
                     f"{t['server_cpu'] * 100:.0f}%.")
    L.extend(lines or ["- (no throughput scenario with both tether and the TCP echo ran)"])
    L.append("\nWhere the TCP row is well above tether's, the client had room to spare and the "
             "server was the limit; where the load CPU sits near 100%, the client is the limit "
             "and the ratios between servers understate the faster one.\n")
    # bench/fanout.py's section, kept as it is.
    old = path.read_text() if path.exists() else ""
    kept = ""
    if FANOUT_BEGIN in old and FANOUT_END in old:
        section = old.split(FANOUT_BEGIN, 1)[1].split(FANOUT_END, 1)[0]
        kept = "\n" + FANOUT_BEGIN + section + FANOUT_END + "\n"
    path.write_text("\n".join(L) + kept)
    return svg_path


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=6.0,
                        help="seconds per throughput measurement (default 6)")
    parser.add_argument("--runs", type=int, default=3, help="runs of everything (default 3)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="scenarios to run, e.g. a,b,e (default all)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="servers to run (default all): " + ", ".join(SERVERS))
    parser.add_argument("--idle-conns", type=int, default=10_000,
                        help="idle connections for (e) (default 10000)")
    parser.add_argument("--idle-hold", type=float, default=40.0,
                        help="seconds the idle connections are held (default 40)")
    parser.add_argument("--max-other", type=float, default=0.25,
                        help="redo a measurement during which other processes used more than "
                             "this many CPUs (default 0.25)")
    parser.add_argument("--retries", type=int, default=2,
                        help="how often a disturbed measurement is redone (default 2)")
    parser.add_argument("--max-wait", type=float, default=300,
                        help="seconds the whole run may spend waiting for a quiet machine "
                             "(default 300); after that it measures anyway")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="the report (the chart goes beside it as .svg)")
    parser.add_argument("--lock", default=os.environ.get("TETHER_CARGO_LOCK"),
                        help="flock to hold while building and measuring (default: "
                             "$TETHER_CARGO_LOCK, else /tmp/tether-cargo.lock if it exists)")
    parser.add_argument("--tether", type=Path,
                        help="a tether binary to use instead of building target/release/tether")
    parser.add_argument("--load", type=Path,
                        help="the tether binary whose `bench` drives the load (default: the one "
                             "measured), to compare two server builds under the same load")
    parser.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    parser.add_argument("--uws", type=Path, default=UWS[0],
                        help="the folder of the uWebSockets reference servers (uws-echo); "
                             f"default {UWS[0]}; left out of the run when it is not there")
    parser.add_argument("--render", type=Path, metavar="RESULTS",
                        help="only rewrite the report from the raw results a run saved "
                             f"({RESULTS.relative_to(ROOT)})")
    opts = parser.parse_args()
    if opts.render:
        report(json.loads(opts.render.read_text()), opts.out)
        return
    if opts.tether:
        global TETHER
        TETHER = opts.tether.resolve()
        SERVERS["tether"]["cmd"][0] = str(TETHER)
    if opts.load:
        global LOAD
        LOAD = opts.load.resolve()
    scenarios = [s for s in opts.only.split(",") if s]
    servers = [s for s in opts.servers.split(",") if s]
    UWS[0] = opts.uws.resolve()
    if "uws" in servers and not (UWS[0] / "uws-echo").exists():
        print(f"no {UWS[0] / 'uws-echo'}: uWebSockets sits this run out (--uws DIR)",
              file=sys.stderr)
        servers.remove("uws")
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}")
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r}")
    if os.cpu_count() < 2:
        parser.error("needs two CPUs: the server on CPU 0, the load on CPU 1")
    command = " ".join(["python3 bench/compare.py", *sys.argv[1:]])

    # Ctrl-C (even when started with SIGINT ignored, as `cmd &` does), SIGTERM and SIGHUP
    # unwind, so the `finally` below kills every server and load generator.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))

    lock_path = opts.lock or ("/tmp/tether-cargo.lock"
                              if Path("/tmp/tether-cargo.lock").exists() else None)
    lock = None
    if lock_path:
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {lock_path} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)

    # Both sides need a file descriptor per connection for (e).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = time.monotonic()
    WAIT_LEFT[0] = opts.max_wait
    try:
        if not opts.no_build:
            print("building ...", file=sys.stderr, flush=True)
            build(servers, sys.stderr, tether=opts.tether is None)
        samples = {}
        plan = [(s, n) for s in scenarios for n in SCENARIOS[s]["servers"] if n in servers]
        for run in range(opts.runs):
            for s in scenarios:
                names = [n for n in SCENARIOS[s]["servers"] if n in servers]
                shift = run % max(len(names), 1)
                for name in names[shift:] + names[:shift]:
                    done = sum(len(v) for v in samples.values()) + 1
                    print(f"[{done}/{len(plan) * opts.runs}] run {run + 1} ({s}) {name} ... ",
                          end="", file=sys.stderr, flush=True)
                    result = measure(name, s, opts)
                    samples.setdefault((s, name), []).append(result)
        results = {
            "command": command,
            "elapsed": time.monotonic() - started,
            "scenarios": scenarios,
            "facts": machine_facts(),
            "opts": {k: getattr(opts, k) for k in REPORT_OPTS},
            "samples": [{"scenario": s, "server": n, "runs": runs}
                        for (s, n), runs in samples.items()],
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
        report(results, opts.out)
    finally:
        stop_all()
        if lock:
            lock.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; every server and load generator was stopped", file=sys.stderr)
        sys.exit(130)
    except subprocess.CalledProcessError as e:
        sys.exit(f"compare.py: `{' '.join(map(str, e.cmd))}` failed (exit {e.returncode})")
