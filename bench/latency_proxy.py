#!/usr/bin/env python3
"""A TCP proxy that adds a round-trip time: for benchmarks of the agent on a slow link where
netem (`tc qdisc ... netem delay`) is not available (a kernel without sch_netem).

Every byte is passed on half the round trip after it arrived, in each direction, in order;
a new connection's first bytes wait one more round trip (the TCP handshake a real link costs).
No bandwidth limit, no loss. Python standard library only. Usage:

    bench/latency_proxy.py --listen 8081 --to 8080 --rtt-ms 50

Prints "ready" on stdout once it listens.
"""

import argparse
import asyncio
import time


async def pipe(reader, writer, delay, first_extra):
    """Copy reader to writer, each piece `delay` s after it was read (plus `first_extra` for
    the first piece)."""
    queue = asyncio.Queue()

    async def read():
        extra = first_extra
        while True:
            try:
                data = await reader.read(1 << 16)
            except OSError:
                data = b""
            queue.put_nowait((time.monotonic() + delay + extra, data))
            extra = 0.0
            if not data:
                return

    async def write():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    writer.write_eof()
                except OSError:
                    pass
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--to", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, required=True)
    args = ap.parse_args()
    half = args.rtt_ms / 2000.0

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", args.to)
        except OSError:
            client_writer.close()
            return
        up = asyncio.ensure_future(pipe(client_reader, server_writer, half, 2 * half))
        down = asyncio.ensure_future(pipe(server_reader, client_writer, half, 0.0))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_EXCEPTION)
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            for w in (server_writer, client_writer):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
