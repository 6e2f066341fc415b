"""The Python `websockets` echo server (its documented asyncio echo), permessage-deflate on.

Run by `bench/compare.py` from the venv it makes (target/bench-venv):
    target/bench-venv/bin/python bench/python_echo.py --port 0
prints `listening on ws://ADDR/` like the other servers. One asyncio event loop, one thread.
"""

import argparse
import asyncio

from websockets.asyncio.server import serve


async def echo(websocket):
    async for message in websocket:
        await websocket.send(message)


async def main(host, port):
    # compression="deflate" is the default; spelled out because scenario (f) is about it.
    async with serve(echo, host, port, compression="deflate") as server:
        addr = server.sockets[0].getsockname()
        print(f"listening on ws://{addr[0]}:{addr[1]}/", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
