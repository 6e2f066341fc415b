#!/usr/bin/env python3
"""WebSockets over HTTP/2 (RFC 8441) beside HTTP/1.1, on the same `tether serve`.

    python3 bench/http2.py [--tether target/release/tether] [--runs 3] [--duration 5]
        [--write]

`tether serve --h2c` (one worker thread, pinned to CPU 0) answers `/ws/echo`; `tether bench
echo` (pinned to CPU 1) drives 100 WebSockets, each keeping 8 messages in flight: as 100
HTTP/1.1 connections, as 100 streams of one HTTP/2 connection, and as 100 streams spread over
10 connections. Messages of 20 B and of 16 KiB; the runs interleaved, the median kept. Beside
messages/s, the server's CPU time per message (user + system, from /proc). Then the server's
memory per idle WebSocket (scripts/idle-memory serve-echo and serve-echo-h2, 10,000 each).
`--write` puts the table into docs/benchmarks.md between its `http2` markers.

Python 3 standard library only; needs a release build and `taskset`.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = [
    ("HTTP/1.1, 100 connections", []),
    ("HTTP/2, 1 connection", ["--http2", "--http2-connections", "1"]),
    ("HTTP/2, 10 connections", ["--http2", "--http2-connections", "10"]),
]
SIZES = [(20, 8), (16 << 10, 4)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def start_serve(tether, data):
    port = free_port()
    cmd = ["taskset", "-c", "0", tether, "serve", "--listen", f"127.0.0.1:{port}",
           "--data", data, "--threads", "1", "--h2c", "--message-rate", "10000000",
           "--max-connections-per-ip", "10000", "--max-http-connections-per-ip", "1024",
           "--http2-max-streams", "1000"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("tether serve did not start")


def run(tether, pid, port, size, pipeline, extra, duration):
    url = f"ws://127.0.0.1:{port}/ws/echo"
    cmd = ["taskset", "-c", "1", tether, "bench", "echo", url, "--conns", "100",
           "--pipeline", str(pipeline), "--size", str(size), "--binary",
           "--duration", str(duration), "--json", "--quiet", *extra]
    before = cpu_seconds(pid)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    spent = cpu_seconds(pid) - before
    summary = json.loads(out)
    messages = summary["messages"]
    return summary["messages_per_sec"], spent * 1e9 / max(messages, 1)


def idle(tether, target):
    env = dict(os.environ, TETHER_BIN=tether)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "idle-memory"), "10000", target],
                         check=True, capture_output=True, text=True, env=env, timeout=300).stdout
    m = re.search(r"(\d+) B per connection", out)
    return int(m.group(1)) if m else None, out.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tether", default=str(ROOT / "target" / "release" / "tether"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tether-h2-bench-") as data:
        proc, port = start_serve(args.tether, data)
        try:
            for run_no in range(args.runs):
                for size, pipeline in SIZES:
                    for name, extra in MODES:
                        rate, ns = run(args.tether, proc.pid, port, size, pipeline, extra,
                                       args.duration)
                        results.setdefault((size, name), []).append((rate, ns))
                        print(f"run {run_no + 1}: {size} B, {name}: {rate:,.0f} msg/s, "
                              f"{ns:,.0f} ns server CPU per message", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    h1_idle, h1_line = idle(args.tether, "serve-echo")
    h2_idle, h2_line = idle(args.tether, "serve-echo-h2")
    print(h1_line)
    print(h2_line)

    lines = ["| messages | transport | messages/s (median) | vs HTTP/1.1 | server CPU per message |",
             "|---|---|---|---|---|"]
    for size, _ in SIZES:
        base = statistics.median(r for r, _ in results[(size, MODES[0][0])])
        for name, _ in MODES:
            rates = [r for r, _ in results[(size, name)]]
            cpu = statistics.median(n for _, n in results[(size, name)])
            label = "20 B" if size == 20 else f"{size >> 10} KiB"
            lines.append(f"| {label} | {name} | {statistics.median(rates):,.0f} | "
                         f"{statistics.median(rates) / base:.2f}× | {cpu:,.0f} ns |")
    lines.append("")
    lines.append(f"Idle memory per WebSocket (`tether serve`'s `/ws/echo`, 10,000): "
                 f"HTTP/1.1 {h1_idle} B, HTTP/2 (10 connections) {h2_idle} B.")
    table = "\n".join(lines)
    print()
    print(table)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        start, end = "<!-- http2 -->", "<!-- /http2 -->"
        block = f"{start}\n{table}\n{end}"
        if start in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text,
                          flags=re.S)
        else:
            text += ("\n## WebSockets over HTTP/2\n\n`python3 bench/http2.py --write`: "
                     "`tether serve --h2c` (one worker thread, CPU 0), `tether bench echo` "
                     "(CPU 1), 100 WebSockets each keeping messages in flight, "
                     f"{args.runs} interleaved runs of {args.duration:g} s.\n\n{block}\n")
        doc.write_text(text)
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()
