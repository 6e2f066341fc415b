#!/usr/bin/env python3
"""300 wrong-password logins, 40 at a time, against `tether serve`; prints the server's RSS.

    python3 scripts/hostile/login-flood.py target/release/tether [config.toml]

Starts the binary on a fresh data directory with user alice, floods POST /api/login, and reports
the status counts and the RSS before, right after and 5 s after the flood, then whether the right
password still gets through. Pass a config that raises login_failures_per_* and password_queue to
measure the password checks themselves rather than the throttle. Loopback only; stops by itself.
"""
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

binary = sys.argv[1]
config = ["--config", sys.argv[2]] if len(sys.argv) > 2 else []
data = tempfile.mkdtemp()
subprocess.run([binary, "user", "add", "alice", "--data", data, "--password-stdin"],
               input=b"right password\n", check=True, capture_output=True)
server = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data", data] + config,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
url = server.stdout.readline().decode().split()[-1].rstrip("/")


def rss_kib():
    with open(f"/proc/{server.pid}/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS"))


def login(password):
    body = json.dumps({"user": "alice", "password": password}).encode()
    request = urllib.request.Request(url + "/api/login", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.time()
    try:
        return urllib.request.urlopen(request, timeout=30).status, time.time() - started
    except urllib.error.HTTPError as e:
        return e.code, time.time() - started


try:
    time.sleep(0.5)
    before = rss_kib()
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(login, ["wrong"] * 300))
    after = rss_kib()
    time.sleep(5)
    idle = rss_kib()
    counts = {}
    for status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    status, took = login("right password")
    print(f"statuses {counts}; RSS {before} KiB -> {after} KiB after the flood, {idle} KiB 5 s later; "
          f"then the right password: {status} in {took * 1000:.0f} ms")
finally:
    server.terminate()
    server.wait()
