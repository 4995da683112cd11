#!/usr/bin/env python3
"""The noisy-neighbour benchmark: one busy GPU box shared by two tenants.

One upstream (started here) answers each generation after GEN_MS (200 ms)
and Hyperion lets it run 2 at once (`max_inflight_per_server = 2`). Tenant
A sends A_REQUESTS (200) requests at once; tenant B sends one request every
B_EVERY_MS (500 ms) while A's backlog lasts. Run once with `queue = "fifo"`
(arrival order, the behaviour before the fair line) and once with `queue =
"fair"`, the same binary, side by side. Reported per mode: B's wait in line
(its latency less the generation) median and p99, A's completion rate, and
how busy the backend was while A's backlog lasted (slot-seconds used over
slot-seconds there were).

Usage: benches/load/noisy_neighbour.py [HYPERION_BINARY]
(default target/release/hyperion, built first when it is the default).
Writes the report to stdout and to benches/runs/DATE-noisy-neighbour.txt.
Loopback only; every socket has a timeout; standard library only.
"""
import asyncio
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GEN_MS = int(os.environ.get("GEN_MS", "200"))
A_REQUESTS = int(os.environ.get("A_REQUESTS", "200"))
B_EVERY_MS = int(os.environ.get("B_EVERY_MS", "500"))
SLOTS = 2
TIMEOUT = 120


class Backend:
    """A one-route HTTP/1.1 server: every request is a generation of GEN_MS."""

    def __init__(self):
        self.running = 0
        self.busy_since = None
        # (start, end) of every generation, for the utilisation.
        self.spans = []
        self.tasks = set()

    async def stop(self):
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def handle(self, reader, writer):
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
                start = time.monotonic()
                self.running += 1
                await asyncio.sleep(GEN_MS / 1000)
                self.running -= 1
                self.spans.append((start, time.monotonic()))
                body = b'{"model":"m","response":"done","done":true,"eval_count":20}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(asyncio.current_task())
            writer.close()


async def request(port, key, path="/api/generate"):
    """One POST through the proxy; (status, seconds)."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    body = b'{"model":"m","prompt":"hello","stream":false}'
    writer.write(
        b"POST %s HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
        % (path.encode(), key.encode(), len(body), body)
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, time.monotonic() - started


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def run_mode(binary, mode, workdir):
    backend = Backend()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    port = free_port()
    keys = os.path.join(workdir, f"keys-{mode}.toml")
    policy = os.path.join(workdir, f"proxy-{mode}.toml")
    with open(policy, "w") as f:
        f.write(
            f"""[server]
listen = ["127.0.0.1:{port}"]
access_log = "off"

[auth]
keys_file = "{keys}"

[upstreams.gpu]
servers = [{{ url = "http://127.0.0.1:{up_port}" }}]
max_inflight_per_server = {SLOTS}
queue_timeout = "{TIMEOUT}s"
queue = "{mode}"
"""
            + ("max_queued_per_tenant = 1000\n" if mode == "fair" else "")
            + """
[[route]]
name = "all"
upstream = "gpu"
"""
        )
    key_of = {}
    for tenant in ("a", "b"):
        out = subprocess.run(
            [binary, "keys", "add", tenant, "--config", policy],
            check=True, capture_output=True, text=True,
        ).stdout
        key_of[tenant] = next(w for w in out.split() if w.startswith("hyp_"))
    proxy = subprocess.Popen([binary, "--config", policy], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        started = time.monotonic()
        a_tasks = [asyncio.create_task(request(port, key_of["a"])) for _ in range(A_REQUESTS)]
        b_results = []
        a_done = lambda: all(t.done() for t in a_tasks)
        await asyncio.sleep(0.05)
        while not a_done():
            b_results.append(asyncio.create_task(request(port, key_of["b"])))
            await asyncio.sleep(B_EVERY_MS / 1000)
        a_results = [t.result() for t in a_tasks]
        b_results = [await t for t in b_results]
        wall = time.monotonic() - started
        a_ok = sum(1 for s, _ in a_results if s == 200)
        a_end = max(started + secs for _, secs in a_results)
        used = sum(min(e, a_end) - max(s, started) for s, e in backend.spans if s < a_end)
        busy = used / (SLOTS * (a_end - started))
        b_waits = [max(0.0, secs - GEN_MS / 1000) * 1000 for s, secs in b_results if s == 200]
        return {
            "mode": mode,
            "b_requests": len(b_results),
            "b_ok": len(b_waits),
            "b_wait_p50_ms": statistics.median(b_waits) if b_waits else float("nan"),
            "b_wait_p99_ms": percentile(b_waits, 99),
            "a_ok": a_ok,
            "a_rate": a_ok / (a_end - started),
            "a_seconds": a_end - started,
            "busy": busy,
            "wall": wall,
        }
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.close()
        await backend.stop()


async def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else None
    if binary is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
        binary = os.path.join(REPO, "target/release/hyperion")
    with tempfile.TemporaryDirectory() as workdir:
        results = [await run_mode(binary, mode, workdir) for mode in ("fifo", "fair")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        f"noisy neighbour, {datetime.date.today()} at {commit}: one upstream, max_inflight_per_server = {SLOTS}, "
        f"{GEN_MS} ms generations; tenant A sends {A_REQUESTS} at once, tenant B one every {B_EVERY_MS} ms "
        "while A's backlog lasts (fair: max_queued_per_tenant = 1000 so all of A's wait)",
        "",
        "| queue | B's wait p50 | B's wait p99 | B answered | A answered | A's rate | A's backlog lasted | backend busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['b_wait_p50_ms']:.0f} ms | {r['b_wait_p99_ms']:.0f} ms | {r['b_ok']}/{r['b_requests']} | "
            f"{r['a_ok']}/{A_REQUESTS} | {r['a_rate']:.2f}/s | {r['a_seconds']:.1f} s | {r['busy'] * 100:.0f} % |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    runs = os.path.join(REPO, "benches/runs")
    os.makedirs(runs, exist_ok=True)
    with open(os.path.join(runs, f"{datetime.date.today()}-noisy-neighbour.txt"), "w") as f:
        f.write(report)


if __name__ == "__main__":
    asyncio.run(main())
