#!/usr/bin/env python3
"""Fan-out beside uWebSockets: `tether bench fanout` against `tether serve` and uWS.js (issue #16).

    python3 bench/fanout.py                          # 10,000 subscribers, windows 4 and 16, 3 runs
    python3 bench/fanout.py --subscribers 2000 --windows 4 --rates 100 --runs 1 --duration 5

Each measurement starts a server fresh under `taskset -c 0`: `tether serve --threads 1`
(its /ws, tether.v1: every connection subscribes to one room), bench/uws/fanout.mjs (a
uWebSockets.js app that subscribes every connection to one topic and `app.publish`es what it
receives) or uWebSockets' C++ `uws-pubsub`, which does the same (built from its sources
outside this repository: --uws names its folder; left out when absent). `tether bench fanout` under `taskset -c 1` (one tokio worker) opens the
subscribers, and the first of them publishes with a window of publications in flight: the
next goes out once one has reached every subscriber; or at a steady rate (--rates,
publications per second, within a window of 64). Reported: deliveries per second, the
delivery latency's percentiles and, for the rates, deliveries per second of the server's CPU
while publishing (the opening of the subscribers left out), the median over the runs. The servers alternate within
each run. The table goes into docs/benchmarks.md between its fan-out markers (the rest of the
file is bench/compare.py's).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the process helpers: pinned spawns, clean stops)

ROOT = compare.ROOT
UWS = ROOT / "bench" / "uws"
BEGIN, END = compare.FANOUT_BEGIN, compare.FANOUT_END


def start(cmd):
    """Starts `cmd` on the server CPU; returns (process, its `listening on URL` URL)."""
    proc = compare.spawn(cmd, compare.SERVER_CPU, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    for raw in proc.stdout:
        line = raw.decode().strip()
        if "listening on " in line:
            address = line.split("listening on ", 1)[1]
            return proc, address if "://" in address else f"ws://{address}/"
        if time.monotonic() > deadline:
            break
    compare.stop(proc)
    raise RuntimeError(f"{cmd[0]} did not print its address")


# The servers, in the order they are measured, and their names in the tables.
SERVERS = {"tether": "tether", "tether-events": "tether (events, not stored)",
           "tether-h2": "tether, HTTP/2 (10 connections)",
           "tether-woken": "tether, no direct writes",
           "uws-cpp": "uWS C++", "uws": "uWS.js"}
PACED_WINDOW = 64


def measure(server, tether, opts, window, run, data, rate=0):
    """One measurement: a fresh server, one bench run; returns its summary with server CPU."""
    n = opts.subscribers
    if server.startswith("tether"):
        conf = Path(data) / "fanout.toml"
        # One address opens every HTTP/2 connection (tether-h2): lift its budget of rooms started.
        conf.write_text("max_http_connections_per_ip = 1024\nrooms_per_hour = 1000000\n")
        store = tempfile.mkdtemp(dir=data)
        proc, url = start([str(tether), "serve", "--listen", "127.0.0.1:0", "--data", store,
                           "--threads", "1", "--config", str(conf),
                           "--max-connections", str(n + 100),
                           "--max-connections-per-ip", str(n + 100),
                           # One publisher keeps a window in flight: lift the per-sender rates.
                           "--message-rate", "1000000", "--identity-message-rate", "1000000",
                           # The subscribers as streams of 10 HTTP/2 connections (tether-h2).
                           *(["--h2c", "--http2-max-streams", str(n)]
                             if server == "tether-h2" else []),
                           *(["--direct-fanout", "false"] if server == "tether-woken" else [])])
        target = ["ws://" + url.removeprefix("http://").rstrip("/") + f"/ws?name=r{run}w{window}g{{n}}",
                  "--channel", "room:fanout"]
        if server == "tether-events":
            target.append("--events")
        if server == "tether-h2":
            target += ["--http2", "--http2-connections", "10"]
    elif server == "uws-cpp":
        proc, url = start([str(opts.uws / "uws-pubsub"), str(compare.free_port())])
        target = [url]
    else:
        proc, url = start(["node", str(UWS / "fanout.mjs"), "0"])
        target = [url]
    marks, said = {}, []
    try:
        before, began = compare.cpu_seconds(proc.pid), time.monotonic()
        load_before = children_cpu()
        env = dict(os.environ, TOKIO_WORKER_THREADS="1")
        paced = ["--rate", str(rate)] if rate else []
        load = subprocess.Popen(
            ["taskset", "-c", compare.LOAD_CPU, str(tether), "bench", "fanout", *target,
             "--subscribers", str(n), "--window", str(window), "--duration", str(opts.duration),
             "--size", str(opts.size), *paced, "--marks", "--json", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

        def watch():
            # The server's CPU at the load's marks: the publishing alone.
            for line in load.stderr:
                if line.strip() in ("publishing", "published"):
                    marks[line.strip()] = (compare.cpu_seconds(proc.pid), time.monotonic())
                else:
                    said.append(line.strip())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            stdout = load.stdout.read()
            load.wait(timeout=opts.duration + 300)
        finally:
            if load.poll() is None:
                load.kill()
            watcher.join()
        cpu = compare.cpu_seconds(proc.pid) - before
        wall = time.monotonic() - began
        load_cpu = children_cpu() - load_before
    finally:
        compare.stop(proc)
    if not stdout.strip():
        raise RuntimeError(f"bench fanout against {server} printed nothing: {' '.join(said)}")
    summary = json.loads(stdout)
    summary["server_cpu_s"], summary["wall_s"], summary["load_cpu_s"] = cpu, wall, load_cpu
    if "publishing" in marks and "published" in marks:
        summary["phase_cpu_s"] = marks["published"][0] - marks["publishing"][0]
        summary["phase_wall_s"] = marks["published"][1] - marks["publishing"][1]
    if load.returncode != 0:
        summary.setdefault("first_error", " ".join(said))
    return summary


def children_cpu():
    """CPU seconds of the child processes waited for so far (the load generator, once its run
    returns; the server is still running then, so it is not in it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def per_cpu_second(runs):
    """Deliveries per second of the server's CPU while publishing (the whole run's CPU when
    the marks were not seen), the median over the runs."""
    return statistics.median(
        r["deliveries"] / max(r.get("phase_cpu_s", r["server_cpu_s"]), 1e-9) for r in runs)


def reference(results, key):
    """The peer a tether row is compared with: uWebSockets C++ when measured, else uWS.js."""
    for peer in ("uws-cpp", "uws"):
        if results.get((peer, key)):
            return peer
    return None


def table(results, opts, facts, command):
    L = [BEGIN, "## Fan-out beside uWebSockets (issues #16, #32)\n",
         f"Generated by `{command}` on {facts['date']} ({facts['commit']}); "
         f"{opts.runs} run(s) of {opts.duration:g} s per case, {opts.subscribers:,} "
         f"subscribers, {opts.size} B publications.\n",
         "- tether: `tether serve --threads 1`, `/ws` (tether.v1): every connection subscribes to "
         "`room:fanout`; the publisher publishes `{\"text\": …}`, which is stored (SQLite) and then "
         "fanned out as a `pub` push, encoded once for all subscribers.",
         "- tether (events, not stored): the same, but the publisher sends ephemeral events "
         "(`op: event`), which touch no storage and reach every subscriber but their sender "
         "as an `event` push: the path of messages that keep no history.",
         "- tether, HTTP/2: the publications of the first row, with the subscribers opened as "
         "streams of 10 HTTP/2 connections (`tether serve --h2c`, `bench fanout --http2`): "
         "fan-out wakes each stream's session (direct writes are for plain TCP sockets).",
         "- tether, no direct writes (when measured): the first row with `--direct-fanout "
         "false`: every subscriber's session is woken to write, as over HTTP/2.",
         "- uWS C++: uWebSockets' `uws-pubsub` (built from its sources; see the README beside "
         "the binary): every connection subscribed to one topic on open, each received message "
         "published to it; nothing stored.",
         "- uWS.js: bench/uws/fanout.mjs, uWebSockets.js "
         "(`@trufflesuite/uws-js-unofficial` 20.30.0) on Node, the same app.",
         "- Load: `tether bench fanout` (one tokio worker): all subscribers open first, and "
         "read what subscribing brought them until they are quiet for 100 ms; then the "
         "first one publishes, keeping *window* publications in flight (the next goes out once "
         "one has reached every subscriber), or at a steady *rate* (publications per second, "
         f"at most {PACED_WINDOW} in flight); every delivery is counted and timed from the "
         "publisher's send. Server on CPU 0, load on CPU 1, loopback.",
         "- *server CPU* and *load CPU* are the server's and the load generator's CPU time over "
         "the whole bench run's wall time (opening the subscribers included): the side near "
         "100% was the limit. A load generator near its limit adds its own queueing to every "
         "latency, and caps the faster server's rate. *Deliveries per server CPU-second* count "
         "only the server's CPU from the first publication to the last delivery.\n"]
    verdicts = []

    def rows(kind, keys, per_cpu):
        head = ("| window | server | deliveries/s | p50 | p99 | server CPU | load CPU | "
                "ratio (deliveries/s) | p99 ≤ uWS |") if not per_cpu else (
                "| publications/s | server | deliveries/s | p50 | p99 | server CPU while "
                "publishing | deliveries per server CPU-second | ratio (per CPU-second) | "
                "p99 ≤ uWS |")
        L.extend([head, "|---|---|---|---|---|---|---|---|---|"])
        for key in keys:
            ref = reference(results, key)
            for server, name in SERVERS.items():
                runs = results.get((server, key))
                if not runs:
                    continue
                rate = median(runs, "deliveries_per_sec")
                wall = max(median(runs, "wall_s"), 1e-9)
                efficiency = per_cpu_second(runs)
                ratio = p99ok = ""
                if server.startswith("tether") and ref:
                    u = results[(ref, key)]
                    if per_cpu:
                        r = efficiency / per_cpu_second(u)
                    else:
                        r = rate / median(u, "deliveries_per_sec")
                    ok = median(runs, "p99_us") <= median(u, "p99_us")
                    ratio, p99ok = f"{r:.2f}× {SERVERS[ref]}", "yes" if ok else "no"
                    verdicts.append((kind, key, name, r, ok, SERVERS[ref]))
                lat = f"{median(runs, 'p50_us') / 1000:.1f} ms | {median(runs, 'p99_us') / 1000:.1f} ms"
                if per_cpu:
                    phase = statistics.median(
                        r.get("phase_cpu_s", 0) / max(r.get("phase_wall_s", 0), 1e-9) for r in runs)
                    L.append(f"| {key[1:]} | {name} | {rate:,.0f} | {lat} | {phase * 100:.0f}% | "
                             f"{efficiency:,.0f} | {ratio} | {p99ok} |")
                else:
                    cpu = median(runs, "server_cpu_s") / wall
                    load = median(runs, "load_cpu_s") / wall
                    L.append(f"| {key} | {name} | {rate:,.0f} | {lat} | {cpu * 100:.0f}% | "
                             f"{load * 100:.0f}% | {ratio} | {p99ok} |")
        L.append("")

    if opts.windows:
        rows("window", opts.windows, per_cpu=False)
    if opts.rates:
        rows("rate", [f"r{r:g}" for r in opts.rates], per_cpu=True)
    for kind, key, name, r, ok, ref in verdicts:
        met = r >= 1.0 and ok
        what = "rate" if kind == "window" else "deliveries per server CPU-second"
        label = f"Window {key}" if kind == "window" else f"{key[1:]} publications/s"
        L.append(f"- {label}: {name}'s {what} is {r:.2f}× {ref}'s, with its p99 "
                 f"{'at or below' if ok else 'above'} {ref}'s: the target (≥ 1.0× at equal or "
                 f"lower p99) is {'met' if met else 'not met'}.")
    L.append("")
    L.append(END)
    return "\n".join(L)


def splice(path, block):
    """Puts `block` between the fan-out markers of `path` (appended when absent)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--windows", default="4,16", help="publications in flight (default 4,16)")
    parser.add_argument("--rates", default="10,100,500",
                        help="steady publications per second (default 10,100,500; '' for none)")
    parser.add_argument("--uws", type=Path, default=compare.UWS[0],
                        help="the folder of uWebSockets' C++ uws-pubsub (left out when absent)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--size", type=int, default=64, help="bytes per publication")
    parser.add_argument("--tether", type=Path, default=compare.TETHER,
                        help="the tether binary (default target/release/tether)")
    parser.add_argument("--no-build", action="store_true", help="use the binary as it is")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--servers", default=",".join(s for s in SERVERS if s != "tether-woken"),
                        help=f"which to measure, of {','.join(SERVERS)} (default all but "
                             "tether-woken)")
    opts = parser.parse_args()
    opts.windows = [int(w) for w in opts.windows.split(",") if w]
    opts.rates = [float(r) for r in opts.rates.split(",") if r]
    asked = [s for s in opts.servers.split(",") if s]
    unknown = [s for s in asked if s not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}: pick from {list(SERVERS)}")
    servers = [s for s in SERVERS if s in asked
               and (s != "uws-cpp" or (opts.uws / "uws-pubsub").exists())]
    if not opts.no_build and opts.tether == compare.TETHER:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "tether-cli",
                        "--bin", "tether"], cwd=ROOT, check=True)
    if not (UWS / "node_modules").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=UWS, check=True)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as data:
            for run in range(opts.runs):
                order = servers[run % len(servers):] + servers[:run % len(servers)]
                cases = [(w, w, 0) for w in opts.windows]
                cases += [(f"r{r:g}", PACED_WINDOW, r) for r in opts.rates]
                for key, window, rate in cases:
                    for server in order:
                        s = measure(server, opts.tether, opts, window, run, data, rate)
                        results.setdefault((server, key), []).append(s)
                        print(f"run {run + 1} {key} {server}: "
                              f"{s['deliveries_per_sec']:,.0f} deliveries/s, p99 "
                              f"{s['p99_us'] / 1000:.1f} ms, server CPU {s['server_cpu_s']:.1f} s "
                              f"({s.get('phase_cpu_s', 0):.1f} s publishing), "
                              f"missing {s['missing']}, errors {s['errors']}", flush=True)
    finally:
        compare.stop_all()
    facts = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                      capture_output=True, text=True).stdout.strip()}
    command = "python3 bench/fanout.py " + " ".join(sys.argv[1:])
    block = table(results, opts, facts, command.strip())
    splice(opts.out, block)
    print(block)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        compare.stop_all()
        sys.exit(130)
