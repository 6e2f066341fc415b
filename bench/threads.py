#!/usr/bin/env python3
"""How `tether echo` spreads over its worker threads (issue #4: scaling with --threads).

    python3 bench/threads.py [--runs 2] [--duration 4]

Runs scenario (b) of bench/compare.py (100 connections, 20 B, pipeline 32) against
`tether echo --threads 1` and `--threads 2`, unpinned, with the load generator on two tokio
workers, and prints for each: messages/s, messages per server CPU-second, and the CPU each
worker thread used. On a machine whose load generator needs cores of its own, the point is
not the total (server and load share the cores) but that the cost per message stays the same
and the workers carry equal shares: nothing on the echo path is shared between them.
Needs a release build (`cargo build --release -p tether-cli`).
"""

import argparse
import glob
import json
import os
import subprocess
import time
from pathlib import Path

TETHER = Path(__file__).resolve().parent.parent / "target" / "release" / "tether"
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """CPU seconds per thread of `pid`, keyed by thread id."""
    seconds = {}
    for task in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            fields = Path(task).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[task.split("/")[4]] = (int(fields[11]) + int(fields[12])) / TICK
    return seconds


def measure(threads, duration):
    server = subprocess.Popen([str(TETHER), "echo", "--port", "0", "--threads", str(threads)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().split()[-1]
        before, start = thread_cpu(server.pid), time.monotonic()
        load = subprocess.run(
            [str(TETHER), "bench", "echo", url, "--conns", "100", "--size", "20",
             "--pipeline", "32", "--duration", str(duration), "--prebuilt", "--quiet", "--json"],
            capture_output=True, text=True, check=True,
            env=dict(os.environ, TOKIO_WORKER_THREADS="2"))
        after, elapsed = thread_cpu(server.pid), time.monotonic() - start
    finally:
        server.kill()
        server.wait()
    rate = json.loads(load.stdout)["messages_per_sec"]
    used = {t: after[t] - before.get(t, 0.0) for t in after}
    busy = sorted((s for s in used.values() if s > 0.05 * elapsed), reverse=True)
    return rate, rate * elapsed / sum(used.values()), [round(100 * s / elapsed) for s in busy]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--duration", type=float, default=4.0)
    opts = parser.parse_args()
    print("| --threads | messages/s | per server CPU-second | CPU per busy thread |")
    print("|---:|---:|---:|---|")
    for _ in range(opts.runs):
        for threads in (1, 2):
            rate, per_cpu, shares = measure(threads, opts.duration)
            print(f"| {threads} | {rate:,.0f} | {per_cpu:,.0f} | "
                  f"{' / '.join(f'{s}%' for s in shares)} |", flush=True)


if __name__ == "__main__":
    main()
