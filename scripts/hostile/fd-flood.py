#!/usr/bin/env python3
"""400 idle connections from 20 addresses against `tether serve` under `ulimit -n 256`.

    python3 scripts/hostile/fd-flood.py target/release/tether

Reports what GET /healthz answers during the flood and after it, and how often the server
logged "accept failed". Loopback only (127.0.1.1-20 and 127.0.2.1); stops by itself.
"""
import socket
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1]
data = tempfile.mkdtemp()
server = subprocess.Popen(["bash", "-c", 'ulimit -n 256 && exec "$0" serve --listen 127.0.0.1:0 --data "$1"',
                           binary, data], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
url = server.stdout.readline().decode().split()[-1].rstrip("/")
host, port = url.split("//")[1].split(":")


def healthz():
    probe = socket.socket()
    probe.bind(("127.0.2.1", 0))
    probe.settimeout(5)
    started = time.time()
    try:
        probe.connect((host, int(port)))
        probe.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return probe.recv(12).decode()[9:12] or "closed", time.time() - started
    except OSError as e:
        return type(e).__name__, time.time() - started
    finally:
        probe.close()


flood = []
try:
    for i in range(400):
        client = socket.socket()
        client.bind((f"127.0.1.{1 + i % 20}", 0))
        client.connect((host, int(port)))
        flood.append(client)
    time.sleep(0.5)
    during = healthz()
    for client in flood:
        client.close()
    time.sleep(1)
    after = healthz()
finally:
    server.terminate()
    log = server.communicate()[1].decode()
print(f'healthz during the flood: {during[0]} in {during[1] * 1000:.0f} ms; after: {after[0]}; '
      f'"accept failed" logged {log.count("accept failed")} times')
