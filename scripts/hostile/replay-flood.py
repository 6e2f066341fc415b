#!/usr/bin/env python3
"""20 clients ask a room of 10,000 stored 4 KB messages for all of it and never read.

    python3 scripts/hostile/replay-flood.py target/release/tether [config.toml]

Creates the database with one run of the binary, fills room `big` through SQLite, starts the
server again and opens 20 raw WebSocket upgrades to /ws/rooms/big?since=0 with a 4 KiB receive
buffer, reading nothing. Prints the server's RSS before, 3 s after and 13 s after. Use a config
with `max_replay = 10000` to ask for the whole history. Loopback only; stops by itself.
"""
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1]
config = ["--config", sys.argv[2]] if len(sys.argv) > 2 else []
data = tempfile.mkdtemp()


def serve():
    process = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data", data] + config,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    url = process.stdout.readline().decode().split()[-1].rstrip("/")
    return process, url


server, _ = serve()
time.sleep(0.5)
server.terminate()
server.wait()
db = sqlite3.connect(f"{data}/tether.db")
db.executemany("INSERT INTO messages (room, id, user, text, ts) VALUES (?, ?, ?, ?, ?)",
               [("big", i, "old", "x" * 4000, "2026-01-01T00:00:00.000Z") for i in range(1, 10001)])
db.commit()
db.close()

server, url = serve()
host, port = url.split("//")[1].split(":")


def rss_kib():
    with open(f"/proc/{server.pid}/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS"))


try:
    time.sleep(0.5)
    before = rss_kib()
    clients = []
    for i in range(20):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((host, int(port)))
        client.sendall((f"GET /ws/rooms/big?name=stuck{i}&since=0 HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
        clients.append(client)
    time.sleep(3)
    during = rss_kib()
    time.sleep(10)
    later = rss_kib()
    print(f"RSS {before} KiB before, {during} KiB 3 s after 20 stuck replays, {later} KiB 10 s later")
finally:
    server.terminate()
    server.wait()
