"""A light HTTP load generator for the serving benchmarks: ``clients`` keep-alive connections in one asyncio loop,
each POSTing one (user, item) to /v1/explanations and waiting for the answer before the next (a closed loop).

It runs as its own process (``drive``), pinned to cores the server is not on when there are enough of them, so
that the latency measured is the server's and not time spent waiting for the load generator's interpreter: a
threaded ``httpx`` client on the same 2 cores measured stored answers at p95 46 ms where this one, on the other
core, measures the same server at 20 ms.

Usage (normally through ``drive``): python benchmarks/loadgen.py < spec.json > result.json
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


async def _client(host: str, port: int, next_body, stop: float, latencies: list, counts: dict) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop:
            body = next_body()
            if body is None:
                return
            head = (f"POST /v1/explanations HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            start = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status_line, _, headers = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in headers.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            payload = await reader.readexactly(length)
            elapsed = time.perf_counter() - start
            if status_line.split(b" ", 2)[1] == b"200":
                latencies.append(elapsed)
                counts["precomputed"] += sum(bool(e.get("precomputed")) for e in json.loads(payload)["explanations"])
            else:
                counts["errors"] += 1
    finally:
        writer.close()


async def _load(base: str, pairs: list, clients: int, seconds: float, repeat: bool) -> dict:
    url = urlsplit(base)
    bodies = [json.dumps({"items": [{"user_id": u, "item_id": i}]}).encode() for u, i in pairs]
    position = [0]

    def next_body():
        if not repeat and position[0] >= len(bodies):
            return None
        body = bodies[position[0] % len(bodies)]
        position[0] += 1
        return body

    latencies: list[float] = []
    counts = {"errors": 0, "precomputed": 0}
    started = time.monotonic()
    await asyncio.gather(*(_client(url.hostname, url.port, next_body, started + seconds, latencies, counts)
                           for _ in range(clients)))
    elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {"reasons_per_s": len(latencies) / elapsed, "requests": len(latencies), "seconds": elapsed, **counts,
            "p50_s": q[49], "p95_s": q[94], "p99_s": q[98]}


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, OSError):
            pass  # a thread that ended meanwhile


def drive(base: str, pairs: list, clients: int, seconds: float, repeat: bool = False,
          server_pid: int | None = None) -> dict:
    """``clients`` closed-loop clients for ``seconds`` (each pair once, or round and round with ``repeat``) from a
    separate process; with ``server_pid`` and at least 2 cores, the server is pinned to the first core and the load
    generator to the rest for the measurement (and the server unpinned after). Reasons/s, p50/p95/p99 latency,
    errors, and how many answers were precomputed; ``"pinned"`` says whether the cores were split."""
    cpus = sorted(os.sched_getaffinity(0))
    split = server_pid is not None and len(cpus) >= 2
    if split:
        pin(server_pid, {cpus[0]})
    spec = {"base": base, "pairs": [list(p) for p in pairs], "clients": clients, "seconds": seconds, "repeat": repeat}
    try:
        out = subprocess.run([sys.executable, __file__], input=json.dumps(spec), capture_output=True, text=True,
                             check=True, preexec_fn=(lambda: os.sched_setaffinity(0, set(cpus[1:]))) if split else None)
    finally:
        if split:
            pin(server_pid, set(cpus))
    return {**json.loads(out.stdout), "pinned": split}


if __name__ == "__main__":
    spec = json.load(sys.stdin)
    print(json.dumps(asyncio.run(_load(spec["base"], [tuple(p) for p in spec["pairs"]], spec["clients"],
                                       spec["seconds"], spec["repeat"]))))
