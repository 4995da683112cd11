#!/usr/bin/env python3
"""Another client of a shared GPU server, for prefix_affinity.py's `shared`
scenario: CONCURRENCY loops per URL, each posting a chat of WORDS fresh
random words (so every block misses the server's prefix cache) straight to
the server, not through the proxy, and reading the whole stream, until
SIGTERM or SIGINT. Then prints one JSON line: requests answered, and the prompt
blocks they made the servers count (words // BLOCK each, all misses), so
the scenario can take them out of the servers' counts (requests cut off
at the stop are not counted: an error of a few blocks in thousands).

    background_load.py URL [URL...] [--concurrency 5] [--words 320] [--block 16]

Needs httpx.
"""
import argparse
import asyncio
import json
import random
import signal

import httpx

ap = argparse.ArgumentParser()
ap.add_argument("urls", nargs="+")
ap.add_argument("--concurrency", type=int, default=5)
ap.add_argument("--words", type=int, default=320)
ap.add_argument("--block", type=int, default=16)
args = ap.parse_args()

sent = {"requests": 0, "blocks": 0}
WORDS = [f"w{n}" for n in range(5000)]


async def loop(client, url, stop):
    while not stop.is_set():
        prompt = " ".join(random.choice(WORDS) for _ in range(args.words))
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_bytes():
                    pass
            sent["requests"] += 1
            sent["blocks"] += args.words // args.block
        except httpx.HTTPError:
            await asyncio.sleep(0.05)


async def main():
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(s, stop.set)
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(loop(client, u, stop))
                 for u in args.urls for _ in range(args.concurrency)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(sent), flush=True)


asyncio.run(main())
