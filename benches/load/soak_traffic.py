"""The traffic of soak.sh: worker threads of each kind for DURATION seconds,
then a report of requests by kind and outcome, and of every status a kind
does not expect. Loopback only; every socket has a timeout.

Usage: soak_traffic.py PORT DURATION
"""
import collections
import http.client
import json
import random
import socket
import sys
import threading
import time

PORT, DURATION = int(sys.argv[1]), float(sys.argv[2])
DEADLINE = time.time() + DURATION
counts = collections.Counter()
unexpected = collections.Counter()
lock = threading.Lock()

# Statuses that a bad day explains for any kind: the upstream restarting
# (502 unavailable, 503 when every server is out, 504) and the cache's stale
# answers (200).
FAULTS = {502, 503, 504}


def note(kind, outcome, expected=True):
    with lock:
        counts[(kind, outcome)] += 1
        if not expected:
            unexpected[(kind, outcome)] += 1


def prompt_body(prompt, stream):
    return json.dumps({"model": "llama3.2", "prompt": prompt, "stream": stream})


def post(body, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        c.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        return r.status, r.getheader("X-Cache", "-"), data
    finally:
        c.close()


def run(kind, fn):
    def loop():
        while time.time() < DEADLINE:
            try:
                fn()
            except http.client.IncompleteRead:
                # A stream cut short: what a client sees when the upstream
                # dies mid-answer (never a clean end).
                note(kind, "cut mid-answer", expected=kind in ("stream", "whole", "burst", "slow_read", "abort"))
                time.sleep(0.05)
            except (OSError, http.client.HTTPException) as e:
                note(kind, "client error: " + type(e).__name__, expected=kind in ("slow_read", "abort"))
                time.sleep(0.05)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def stream():
    status, cache, data = post(prompt_body(f"stream {random.random()}", True))
    note("stream", f"{status} {cache}", status == 200 or status in FAULTS)


def whole():
    status, cache, data = post(prompt_body(f"whole {random.random()}", False))
    note("whole", f"{status} {cache}", status == 200 or status in FAULTS)


def hit():
    status, cache, _ = post(prompt_body(f"popular {random.randint(0, 4)}", False))
    note("hit", f"{status} {cache}", status == 200 or status in FAULTS)
    time.sleep(0.01)


def burst():
    prompt = f"burst {random.random()}"
    results = []

    def one():
        try:
            results.append(post(prompt_body(prompt, True)))
        except http.client.IncompleteRead:
            note("burst", "cut mid-answer")
        except (OSError, http.client.HTTPException) as e:
            note("burst", "client error: " + type(e).__name__, expected=False)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for status, cache, _ in results:
        note("burst", f"{status} {cache}", status == 200 or status in FAULTS)
    time.sleep(0.5)


def raw(head_and_body, timeout):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=timeout)
    s.sendall(head_and_body)
    return s


def slow_read():
    body = prompt_body(f"slow {random.random()}", True).encode()
    head = f"POST /api/generate HTTP/1.1\r\nHost: x\r\nCache-Control: no-store\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    s = raw(head + body, 10)
    try:
        never = random.random() < 0.5
        got = b""
        started = time.time()
        while time.time() - started < 8:
            if never:
                time.sleep(0.5)
                continue
            chunk = s.recv(1)
            if not chunk:
                break
            got += chunk
            time.sleep(0.05)
        note("slow_read", "never read" if never else f"read {len(got) // 100 * 100}+ bytes")
    finally:
        s.close()


def slow_up():
    body = prompt_body(f"upload {random.random()}", False).encode()
    head = f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    stop = random.random() < 0.3
    s = raw(head, 10)
    try:
        for i in range(0, len(body), 8):
            if stop and i > 16:
                break
            s.sendall(body[i:i + 8])
            time.sleep(0.05)
        s.settimeout(10)
        answer = s.recv(64).decode(errors="replace")
        status = answer[9:12] if answer.startswith("HTTP/1.1") else "closed"
        expected = (status == "408") if stop else (status == "200" or status.isdigit() and int(status) in FAULTS)
        note("slow_up", f"{'stopped' if stop else 'finished'} {status}", expected)
    finally:
        s.close()


def abort():
    body = prompt_body(f"abort {random.random()}", True).encode()
    head = f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    s = raw(head + body, 10)
    try:
        s.recv(512)
        note("abort", "left after the first bytes")
    finally:
        s.close()
    time.sleep(0.1)


threads = [run("stream", stream) for _ in range(3)]
threads += [run("whole", whole) for _ in range(2)]
threads += [run("hit", hit) for _ in range(2)]
threads += [run("burst", burst)]
threads += [run("slow_read", slow_read) for _ in range(2)]
threads += [run("slow_up", slow_up) for _ in range(2)]
threads += [run("abort", abort)]
for t in threads:
    t.join(DURATION + 120)

total = sum(counts.values())
print(f"{total} requests")
for (kind, outcome), n in sorted(counts.items()):
    print(f"  {kind:10s} {outcome:32s} {n}")
print(f"unexpected: {sum(unexpected.values())}")
for (kind, outcome), n in sorted(unexpected.items()):
    print(f"  {kind:10s} {outcome:32s} {n}")
