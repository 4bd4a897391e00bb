"""A network link to measure across: two namespaces joined by a veth pair, shaped by tc.

`tbf` limits the rate at both ends; this kernel has no `netem`, so latency comes from a relay
in the client's namespace (python -m bench.harness.netns relay ...) that holds every chunk
for half the round trip in each direction. Everything is made by the bench and removed by
it (deleting a namespace deletes its end of the veth, and so the pair).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from typing import Any

SRC_IP, DST_IP = "10.231.0.1", "10.231.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Link:
    """src: the source side's namespace (servers), dst: the target side's (clients)."""

    def __init__(self, rate_bit: int | None) -> None:
        tag = f"{os.getpid() % 100000}"
        self.src, self.dst = f"tbsrc{tag}", f"tbdst{tag}"
        self.vs, self.vd = f"tbs{tag}", f"tbd{tag}"
        self.rate = rate_bit

    def __enter__(self) -> Link:
        try:
            for ns in (self.src, self.dst):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.vs, "netns", self.src, "type", "veth", "peer", "name",
                self.vd, "netns", self.dst)
            for ns, dev, addr in ((self.src, self.vs, SRC_IP), (self.dst, self.vd, DST_IP)):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                if self.rate:  # a burst of ~4 ms of the rate (at least 64 KiB): tbf at HZ 250
                    burst = max(self.rate // 8 // 250, 64 << 10)
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
                                    "root", "tbf", "rate", f"{self.rate}bit", "burst",
                                    str(burst), "latency", "100ms"], check=True,
                                   capture_output=True, timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def exec(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def wire_bytes(self) -> int:
        """Bytes the source's end has sent and received so far."""
        out = subprocess.run(["ip", "-n", self.src, "-s", "-j", "link", "show", self.vs],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]) + int(stats["rx"]["bytes"])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def feed() -> None:
        while data := await reader.read(1 << 16):
            q.put_nowait((loop.time() + delay, data))
        q.put_nowait((loop.time() + delay, b""))

    async def drain() -> None:
        while True:
            due, data = await q.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(feed(), drain())
    except OSError:
        pass
    finally:
        writer.close()


async def _relay(listen: int, host: str, port: int, delay: float) -> None:
    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, uw, delay), _pipe(ur, w, delay))

    server = await asyncio.start_server(client, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.harness.netns relay")
    p.add_argument("command", choices=["relay"])
    p.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    p.add_argument("--to", required=True, help="HOST:PORT")
    p.add_argument("--delay", type=float, required=True, help="seconds, each direction")
    a = p.parse_args(argv)
    host, port = a.to.rsplit(":", 1)
    try:
        asyncio.run(_relay(a.listen, host, int(port), a.delay))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
