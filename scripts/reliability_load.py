"""The bounded load of issue 18: a real `ptm-course serve` child process on 127.0.0.1, 4 clients for
20 s sending valid requests mixed with the worst inputs (the fully inked 4096×4096 PNG, the largest
image it accepts, a 9-megapixel JPEG, JSON nested 100,000 deep, 10**400 as a pixel, a lone
surrogate), while a separate process asks /health every 20 ms (at least 5 answers a second are required). Prints the measured figures (with
the machine's load average) as text and one JSON line; exits 1 unless there was no 5xx, the /health
p99 stayed under 50 ms and the server's RSS came back within 100 MB of its start.

    python scripts/reliability_load.py [--models DIR] [--seconds 20] [--clients 4]

All traffic goes to 127.0.0.1 only."""
from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np


def rss_mb(pid: int) -> float:
    "The resident set size of process `pid` in MB, from /proc/PID/status (VmRSS)."
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"): return int(line.split()[1])/1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def png(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO(); Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def requests_mix() -> list[tuple[str, str, bytes, str]]:
    "(name, path, body, content type): valid requests and the worst inputs, alternating."
    from PIL import Image
    from ptm_course.data import load_mnist, review_splits
    images, _ = load_mnist(train=False)
    digit = images[0].numpy()
    drawing = np.kron(digit, np.ones((10, 10), np.uint8))  # 280×280, like the page's canvas
    jpeg = np.zeros((3000, 3000), np.uint8); jpeg[600:2400, 1400:1600] = 255
    buf = io.BytesIO(); Image.fromarray(jpeg).save(buf, format="JPEG", quality=90)
    worst = png(np.full((4096, 4096), 255, np.uint8))
    review = review_splits(seed=0)["test"][0].text
    j = "application/json"
    valid = [("pixels", "/v1/digits", json.dumps({"pixels": digit.tolist()}).encode(), j),
             ("review", "/v1/reviews", json.dumps({"text": review}).encode(), j),
             ("drawing png", "/v1/digits", png(drawing), "image/png"),
             ("drawing base64", "/v1/digits", json.dumps({"image": "data:image/png;base64," + base64.b64encode(png(drawing)).decode()}).encode(), j)]
    worst_inputs = [("4096x4096 inked png", "/v1/digits", worst, "image/png"),
                    ("4096x4096 inked png, base64", "/v1/digits", json.dumps({"image": base64.b64encode(worst).decode()}).encode(), j),
                    ("1024x1024 inked png (largest accepted)", "/v1/digits", png(np.full((1024, 1024), 255, np.uint8)), "image/png"),
                    ("3000x3000 jpeg (draft)", "/v1/digits", buf.getvalue(), "image/jpeg"),
                    ("json nested 100,000 deep", "/v1/digits", b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", j),
                    ("10**400 pixel", "/v1/digits", json.dumps({"pixels": [[10**400] * 28] * 28}).encode(), j),
                    ("5,000-digit integer", "/v1/digits", b'{"pixels": [[' + b"9" * 5000 + b"]]}", j),
                    ("lone surrogate", "/v1/reviews", b'{"text": "\\ud800"}', j)]
    mix = []
    for i in range(max(len(valid), len(worst_inputs))):
        mix += [valid[i % len(valid)], worst_inputs[i % len(worst_inputs)]]
    return mix


def probe_health(url: str, every: float, ready, stop, out):
    "In its own process (no GIL shared with the clients): GET /health every `every` s from when it says `ready` until `stop` is set; sends back latencies (ms) and failures."
    import httpx
    times, failures = [], 0
    with httpx.Client(base_url=url, timeout=5) as client:
        client.get("/health")  # connected and warm before the clock starts
        ready.set()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = client.get("/health").status_code == 200
            except httpx.HTTPError: ok = False
            took = 1e3*(time.perf_counter() - t0)
            if ok: times.append(took)
            else: failures += 1
            time.sleep(max(0.0, every - took/1e3))
    out.put((times, failures))


def run(folder, seconds: float = 20.0, clients: int = 4) -> dict:
    import httpx
    from ptm_course import deploy as D
    mix = requests_mix()
    with D.server_process(folder) as url:
        with httpx.Client(base_url=url, timeout=30) as c:  # warm up: one request of each kind, then the starting RSS
            for _, path, body, ct in mix: c.post(path, content=body, headers={"content-type": ct})
        time.sleep(0.5)
        rss_start = rss_mb(url.pid)
        ctx = mp.get_context("spawn")
        queue, ready, stop = ctx.Queue(), ctx.Event(), ctx.Event()
        prober = ctx.Process(target=probe_health, args=(str(url), 0.02, ready, stop, queue))
        prober.start()
        if not ready.wait(120): raise RuntimeError("the /health prober did not start within 120 s")
        stop_at = time.time() + seconds
        statuses, per_kind, lock = Counter(), {}, threading.Lock()
        rss_peak = [rss_start]
        def client(k):
            i = k
            with httpx.Client(base_url=url, timeout=30) as c:
                while time.time() < stop_at:
                    name, path, body, ct = mix[i % len(mix)]; i += 1
                    try: status = str(c.post(path, content=body, headers={"content-type": ct}).status_code)
                    except httpx.HTTPError as e: status = type(e).__name__
                    with lock:
                        statuses[status] += 1
                        per_kind.setdefault(name, Counter())[status] += 1
        def watch_rss():
            while time.time() < stop_at:
                rss_peak[0] = max(rss_peak[0], rss_mb(url.pid)); time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)] + [threading.Thread(target=watch_rss)]
        for t in threads: t.start()
        for t in threads: t.join()
        stop.set()
        health_ms, health_failures = queue.get(timeout=60)
        prober.join(10)
        settle_until = time.time() + 10  # memory freed by the decoders: give the allocator a moment
        while True:
            rss_end = rss_mb(url.pid)
            if rss_end - rss_start <= 100 or time.time() > settle_until: break
            time.sleep(0.5)
        log = Path(url.log_path).read_text(errors="replace")
    h = np.array(health_ms) if health_ms else np.array([np.nan])
    server_errors = sum(n for s, n in statuses.items() if s.startswith("5"))
    other_failures = sum(n for s, n in statuses.items() if not s[0].isdigit())
    res = dict(seconds=seconds, clients=clients, requests=sum(statuses.values()), statuses=dict(statuses),
               per_kind={k: dict(v) for k, v in per_kind.items()}, server_errors=server_errors, client_failures=other_failures,
               health_requests=len(health_ms), health_failures=health_failures,
               health_p50_ms=round(float(np.percentile(h, 50)), 2), health_p99_ms=round(float(np.percentile(h, 99)), 2),
               health_max_ms=round(float(np.max(h)), 2), rss_start_mb=round(rss_start, 1), rss_peak_mb=round(rss_peak[0], 1),
               rss_end_mb=round(rss_end, 1), tracebacks_in_log=log.count("Traceback"),
               load_average=[round(x, 2) for x in os.getloadavg()], cpu_count=os.cpu_count())
    res["passed"] = (server_errors == 0 and other_failures == 0 and health_failures == 0 and len(health_ms) >= 5*seconds and res["health_p99_ms"] < 50
                     and res["rss_end_mb"] - res["rss_start_mb"] <= 100 and res["tracebacks_in_log"] == 0)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="a model folder (default: the course's, built when missing)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args(argv)
    from ptm_course import deploy as D
    folder = args.models or D.ensure_bundle()
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    res = run(folder, args.seconds, args.clients)
    for kind, st in res["per_kind"].items(): print(f"  {kind:42s} {st}")
    print(f"{res['requests']} requests from {res['clients']} clients in {res['seconds']:.0f} s: statuses {res['statuses']}, "
          f"5xx {res['server_errors']}, client failures {res['client_failures']}")
    print(f"/health: {res['health_requests']} requests, p50 {res['health_p50_ms']} ms, p99 {res['health_p99_ms']} ms, "
          f"max {res['health_max_ms']} ms, failures {res['health_failures']}")
    print(f"server RSS: {res['rss_start_mb']} MB at start, {res['rss_peak_mb']} MB at peak, {res['rss_end_mb']} MB after; "
          f"tracebacks in its log: {res['tracebacks_in_log']}; load average after: {res['load_average']}")
    print("PASSED" if res["passed"] else "FAILED: needs zero 5xx, /health p99 < 50 ms, RSS back within 100 MB, no traceback")
    print(json.dumps(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
