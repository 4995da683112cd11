#!/usr/bin/env python3
"""Balancing a GPU fleet by where the conversation's prefix is cached: the
reference scenario of issue 33, run through Hyperion once per `balance`
strategy against the simulated fleet in ../shared/sim (four servers with
LRU prefix caches), printing the table: prefix-block hit ratio (the
servers' own count), mean and p95 time to first token.

    benches/load/prefix_affinity.py [HYPERION_BINARY] [--strategies a,b,...]
        [--scenario reference|ollama|skewed|all] [--users 16] [--turns 8]
        [--tenants 4] [--system-words 1600] [--turn-words 120] [--out FILE]

Scenarios: `reference` is issue 33's (../shared/sim/workload.py against
/v1/chat/completions); `ollama` the same users against Ollama's /api/chat
(NDJSON); `skewed` 80 % of the users on one tenant's system prompt (both
through prefix_workload.py, here); `shared` the reference users while
other clients load two of the four servers directly (background_load.py),
which is where `engine_signals = "vllm"` (the simulator serves vLLM's
queue gauges at /metrics) is compared with the proxy's own counts. Each strategy gets a fresh fleet (empty
caches) and a fresh proxy; every run uses the same seed. The simulator
and workload need fastapi, uvicorn and httpx: they run from a venv made
here (.venv-sim, from PyPI) unless SIM_PYTHON names a Python that has them.

About `prefix_cache_tokens`: the simulator's cache holds 300 blocks of 16
words, and it counts a word as a token; its words average about 15 bytes,
where a real token is about 4, so its cache holds about 18,000 tokens as
Hyperion estimates them (bytes / 4). That is what the prefix_affinity run
is told, as an operator would set it from the engine's "KV cache size".

About `max_inflight_per_server = 4`: the simulator runs 4 requests at once
per server. Told so, prefix_affinity keeps a conversation on its server
until that server is full, instead of bounding it at 1.25x an even share of
the requests in flight (which, with few in flight, moves a tenant's second
user elsewhere at once). The least_inflight row with the same setting shows
what the slot limit does by itself.

Everything runs on loopback ports 27801-27810 and is stopped at the end.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM = os.path.join(REPO, "..", "shared", "sim")
SERVER_PORTS = [27801, 27802, 27803, 27804]
PROXY_PORT = 27809

STRATEGIES = {
    "round_robin": 'balance = "round_robin"',
    "least_inflight": 'balance = "least_inflight"',
    "p2c_ewma": 'balance = "p2c_ewma"',
    "consistent_hash (x-session-id)": 'balance = "consistent_hash"\nhash_key = "header:x-session-id"',
    "least_inflight + max_inflight_per_server = 4": 'balance = "least_inflight"\nmax_inflight_per_server = 4',
    "prefix_affinity": 'balance = "prefix_affinity"\nprefix_cache_tokens = 18000',
    "prefix_affinity + max_inflight_per_server = 4":
        'balance = "prefix_affinity"\nprefix_cache_tokens = 18000\nmax_inflight_per_server = 4',
    "least_inflight + engine_signals": 'balance = "least_inflight"\nengine_signals = "vllm"',
    "prefix_affinity + max_inflight_per_server = 4 + engine_signals":
        'balance = "prefix_affinity"\nprefix_cache_tokens = 18000\nmax_inflight_per_server = 4\nengine_signals = "vllm"',
}

# What each scenario runs unless --strategies says otherwise: engine
# signals only matter where the servers have other clients.
ENGINE_ROWS = {"least_inflight + engine_signals", "prefix_affinity + max_inflight_per_server = 4 + engine_signals"}
SHARED_ROWS = ["least_inflight", "least_inflight + engine_signals", "prefix_affinity + max_inflight_per_server = 4",
               "prefix_affinity + max_inflight_per_server = 4 + engine_signals"]


def sim_python():
    if os.environ.get("SIM_PYTHON"):
        return os.environ["SIM_PYTHON"]
    venv = os.path.join(REPO, ".venv-sim")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "fastapi", "uvicorn", "httpx"], check=True)
    return py


def wait_http(url, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit("nothing answers at " + url)


def stats(port):
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5).read())


def workload(scenario, py, args):
    """The workload's command line for `scenario`."""
    common = ["--users", str(args.users), "--turns", str(args.turns), "--tenants", str(args.tenants),
              "--system-words", str(args.system_words), "--turn-words", str(args.turn_words)]
    base = f"http://127.0.0.1:{PROXY_PORT}"
    here = os.path.dirname(os.path.abspath(__file__))
    if scenario == "reference":
        return [py, os.path.join(SIM, "workload.py"), base + "/v1/chat/completions"] + common
    if scenario == "ollama":
        return [py, os.path.join(here, "prefix_workload.py"), base + "/api/chat", "--api", "ollama"] + common
    if scenario == "shared":
        return [py, os.path.join(SIM, "workload.py"), base + "/v1/chat/completions"] + common
    return [py, os.path.join(here, "prefix_workload.py"), base + "/v1/chat/completions", "--skew", "0.8"] + common


def run(strategy, extra, binary, py, args, workdir, scenario):
    procs = []
    try:
        for p in SERVER_PORTS:
            procs.append(subprocess.Popen(
                [py, os.path.join(SIM, "sim_backend.py"), "--port", str(p), "--slots", "4",
                 "--cache-blocks", "300", "--prefill-ms-per-block", "6"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in SERVER_PORTS:
            wait_http(f"http://127.0.0.1:{p}/_stats")
        servers = ", ".join(f'{{ url = "http://127.0.0.1:{p}" }}' for p in SERVER_PORTS)
        policy = os.path.join(workdir, "policy.toml")
        with open(policy, "w") as f:
            f.write(f"""[server]
listen = ["127.0.0.1:{PROXY_PORT}"]
access_log = "off"

[upstreams.fleet]
servers = [{servers}]
response_timeout = "120s"
{extra}

[[route]]
name = "all"
upstream = "fleet"
""")
        subprocess.run([binary, "check", "--config", policy], check=True, stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen([binary, "--config", policy],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{PROXY_PORT}/_stats")
        background = None
        if scenario == "shared":
            # Other clients keep the first two servers busy, not through
            # the proxy: 5 streams each on 4 slots.
            here = os.path.dirname(os.path.abspath(__file__))
            background = subprocess.Popen(
                [py, os.path.join(here, "background_load.py"), "--concurrency", str(args.background)]
                + [f"http://127.0.0.1:{p}" for p in SERVER_PORTS[:2]],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(2)
        out = subprocess.run(workload(scenario, py, args),
                             check=True, capture_output=True, text=True, timeout=600)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        others = {"requests": 0, "blocks": 0}
        if background:
            background.send_signal(signal.SIGTERM)
            others = json.loads(background.communicate(timeout=30)[0].strip().splitlines()[-1])
        per_server = [stats(p) for p in SERVER_PORTS]
        hit = sum(s["hit_blocks"] for s in per_server)
        # The other clients' prompts are fresh words: all misses.
        miss = sum(s["miss_blocks"] for s in per_server) - others["blocks"]
        result["hit_ratio"] = hit / (hit + miss) if hit + miss else 0.0
        result["requests_per_server"] = [s["requests"] for s in per_server]
        result["requests_per_server"][:2] = [r - others["requests"] // 2 for r in result["requests_per_server"][:2]]
        return result
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.path.join(REPO, "target", "release", "hyperion"))
    ap.add_argument("--strategies", default="")
    ap.add_argument("--scenario", choices=["reference", "ollama", "skewed", "shared", "all"], default="reference")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--system-words", type=int, default=1600)
    ap.add_argument("--turn-words", type=int, default=120)
    ap.add_argument("--background", type=int, default=5,
                    help="shared: the other clients' streams on each of servers 1 and 2")
    ap.add_argument("--out", default=os.path.join(
        REPO, "benches", "runs", time.strftime("%Y-%m-%d") + "-prefix-affinity.txt"))
    args = ap.parse_args()
    py = sim_python()
    chosen = args.strategies.split(",") if args.strategies else None
    scenarios = ["reference", "ollama", "skewed", "shared"] if args.scenario == "all" else [args.scenario]

    def wanted(scenario):
        if chosen:
            return [s for s in STRATEGIES if s.split(" ")[0] in chosen or s in chosen]
        if scenario == "shared":
            return SHARED_ROWS
        return [s for s in STRATEGIES if s not in ENGINE_ROWS]
    lines = [
        f"# prefix-affinity benchmark — {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"# command: benches/load/prefix_affinity.py {args.binary} --scenario {args.scenario} (users {args.users}, "
        f"turns {args.turns}, tenants {args.tenants}, system words {args.system_words}, turn words {args.turn_words})",
        "# fleet: 4 × sim_backend.py --slots 4 --cache-blocks 300 --prefill-ms-per-block 6",
    ]
    described = {
        "reference": "reference: ../shared/sim/workload.py, /v1/chat/completions (SSE)",
        "ollama": "ollama: the same users on /api/chat (NDJSON), prefix_workload.py",
        "skewed": "skewed: 80 % of the users on tenant 0's system prompt, prefix_workload.py",
        "shared": "shared: the reference users, while other clients (background_load.py, not through the proxy) keep "
                  f"{args.background} streams of fresh 320-word prompts on each of servers 1 and 2; hit ratio and requests are the proxy's clients' only",
    }
    with tempfile.TemporaryDirectory() as workdir:
        for scenario in scenarios:
            lines += ["", f"## {described[scenario]}", "",
                      "| balance | prefix-block hit ratio | mean TTFT | p95 TTFT | requests per server | errors |",
                      "|---|---|---|---|---|---|"]
            for name in wanted(scenario):
                r = run(name, STRATEGIES[name], args.binary, py, args, workdir, scenario)
                print(f"  {scenario} {name}: {json.dumps(r)}", file=sys.stderr)
                lines.append(f"| {name} | {r['hit_ratio']:.2f} | {r['ttft_ms_mean']:.0f} ms | {r['ttft_ms_p95']:.0f} ms "
                             f"| {'/'.join(map(str, r['requests_per_server']))} | {r['errors']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print("report: " + args.out)


if __name__ == "__main__":
    main()
