#!/usr/bin/env python3
"""Multi-turn chat users for prefix_affinity.py, where ../shared/sim's
workload.py cannot go: a skewed tenant mix, and Ollama's /api/chat
(NDJSON) as well as OpenAI's /v1/chat/completions (SSE).

    prefix_workload.py URL [--api openai|ollama] [--users 16] [--turns 8]
        [--tenants 4] [--skew 0.8] [--system-words 1600] [--turn-words 120]
        [--think-ms 200] [--seed 7]

Users belong to tenants (each tenant one long system prompt); with
--skew S, a share S of the users are tenant 0's and the rest are spread
over the others. Each user's conversation grows every turn by its question
and the answer. Prints one JSON line: TTFT p50/p95/mean (ms), requests,
errors, wall time. Needs httpx.
"""
import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("--api", choices=["openai", "ollama"], default="openai")
ap.add_argument("--users", type=int, default=16)
ap.add_argument("--turns", type=int, default=8)
ap.add_argument("--tenants", type=int, default=4)
ap.add_argument("--skew", type=float, default=None)
ap.add_argument("--system-words", type=int, default=1600)
ap.add_argument("--turn-words", type=int, default=120)
ap.add_argument("--think-ms", type=float, default=200)
ap.add_argument("--seed", type=int, default=7)
A = ap.parse_args()
rnd = random.Random(A.seed)
run = "%x" % time.time_ns()
prompts = [" ".join(f"sys{t}-{i}" for i in range(A.system_words)) for t in range(A.tenants)]
ttfts, errors = [], 0


def tenant_of(u):
    if A.skew is None:
        return u % A.tenants
    heavy = round(A.users * A.skew)
    if u < heavy:
        return 0
    return 1 + (u - heavy) % max(A.tenants - 1, 1)


def first_text(line):
    """The generated text in one streamed line, or None."""
    if A.api == "openai":
        if not line.startswith("data: {"):
            return None
        return json.loads(line[6:])["choices"][0]["delta"].get("content", "")
    if not line.startswith("{"):
        return None
    msg = json.loads(line)
    if msg.get("done"):
        return None
    return msg.get("message", {}).get("content", "")


async def user(client, u):
    global errors
    messages = [{"role": "system", "content": prompts[tenant_of(u)]}]
    await asyncio.sleep(rnd.random() * 0.5)
    for t in range(A.turns):
        question = " ".join(f"{run}u{u}t{t}q{i}" for i in range(A.turn_words))
        messages.append({"role": "user", "content": question})
        body = {"model": "m", "messages": messages, "stream": True}
        started = time.perf_counter()
        first, answer = None, []
        try:
            async with client.stream("POST", A.url, json=body, headers={"Cache-Control": "no-store"}) as r:
                async for line in r.aiter_lines():
                    text = first_text(line)
                    if text is not None:
                        first = first or time.perf_counter()
                        answer.append(text)
            if first is None or r.status_code != 200:
                errors += 1
            else:
                ttfts.append((first - started) * 1000)
        except Exception:
            errors += 1
        messages.append({"role": "assistant", "content": "".join(answer)})
        await asyncio.sleep(A.think_ms / 1000)


async def main():
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=A.users * 2)) as c:
        await asyncio.gather(*[user(c, u) for u in range(A.users)])
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 2 else [0] * 19
    print(json.dumps({
        "requests": len(ttfts), "errors": errors,
        "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
        "ttft_ms_p95": round(q[18], 1),
        "ttft_ms_mean": round(statistics.mean(ttfts), 1) if ttfts else None,
        "wall_s": round(time.perf_counter() - started, 1),
    }))


asyncio.run(main())
