"""Service throughput and latency: ``latentdiff serve`` with and without batching, N concurrent clients.

Two servers run side by side on the same model (random weights of a preset, or ``--model``): one
with ``--batch-size 1`` (every image its own U-Net call, nothing shared) and one with
``--batch-size B`` (compatible jobs share calls). Each round, ``--clients`` threads each send
``--requests`` ``POST /v1/generate`` calls (one image each, their own seeds) to one server, then to
the other, so that both see the same machine state (interleaved, ``--rounds`` times). Measured per
server: images/s over the round's wall time and the p50 / p99 latency of one request (submit to
answer). Prints a table and writes JSON to ``benchmarks/results/serve.json`` (not committed).

    python benchmarks/serve.py --preset tiny --clients 4 --requests 2 --steps 2 --size 32        # smoke, CPU
    python benchmarks/serve.py --preset sd15 --device cuda --dtype float16 --clients 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, batch_size: int, data: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    source = ["--model", args.model] if args.model else ["--preset", args.preset]
    command = [sys.executable, "-m", "latentdiff", "serve", *source, "--port", str(port), "--data", str(data),
               "--batch-size", str(batch_size), "--dtype", args.dtype, "--max-images", "64"]  # fmt: skip
    if args.device:
        command += ["--device", args.device]
    log = open(data.parent / f"{data.name}.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: see {log.name}")
        try:
            if httpx2.get(url + "/v1/health", timeout=2, trust_env=False).status_code == 200:
                return process, url
        except httpx2.TransportError:
            time.sleep(0.3)
    raise SystemExit("the server did not start in 10 minutes")


def round_(url: str, args, seed0: int) -> dict:
    """One round against one server: every client sends its requests one after the other."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx2.Client(base_url=url, timeout=3600, trust_env=False) as http:
            for r in range(args.requests):
                body = {"prompt": f"client {c} request {r}", "seed": seed0 + c * 1000 + r,
                        "num_inference_steps": args.steps, "height": args.size, "width": args.size,
                        "guidance_scale": 7.5, "scheduler": args.scheduler}  # fmt: skip
                t0 = time.perf_counter()
                answer = http.post("/v1/generate", json=body)
                elapsed = time.perf_counter() - t0
                with lock:
                    (latencies.append(elapsed) if answer.status_code == 200 else errors.append(answer.text[:200]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return {"wall_s": wall, "latencies": latencies}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="a model folder instead of --preset")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--scheduler", default="euler_a")
    p.add_argument("--batch-size", type=int, default=4, help="the batching server's U-Net batch (default 4)")
    p.add_argument("--json", default="benchmarks/results/serve.json")
    args = p.parse_args()

    servers = {}
    with tempfile.TemporaryDirectory(prefix="latentdiff-bench-") as tmp:
        try:
            for label, size in (("no batching", 1), (f"batching ({args.batch_size})", args.batch_size)):
                servers[label] = start(args, size, Path(tmp) / label.split()[0])
            results = {label: [] for label in servers}
            warm = {"prompt": "warm-up", "seed": 0, "num_inference_steps": args.steps, "height": args.size,
                    "width": args.size, "scheduler": args.scheduler}  # fmt: skip
            for _, url in servers.values():  # first call of each shape (allocators, kernels)
                httpx2.post(url + "/v1/generate", json=warm, timeout=3600, trust_env=False)
            for r in range(args.rounds):
                for label, (_, url) in servers.items():  # interleaved: same machine state for both
                    results[label].append(round_(url, args, seed0=r * 100_000))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(60)

    images = args.clients * args.requests
    rows = []
    for label, rounds in results.items():
        latencies = [x for rnd in rounds for x in rnd["latencies"]]
        rows.append({
            "server": label, "images_per_s": statistics.median(images / rnd["wall_s"] for rnd in rounds),
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "requests": len(latencies),
        })  # fmt: skip
    device = args.device or "cpu"
    print(f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds, {args.size}x{args.size}, "
          f"{args.steps} {args.scheduler} steps, {args.model or 'preset ' + args.preset}, {device} "
          f"({platform.machine()}, {os.cpu_count()} cores)")  # fmt: skip
    print(f"{'server':<16}{'images/s':>10}{'p50 s':>10}{'p99 s':>10}")
    for row in rows:
        print(f"{row['server']:<16}{row['images_per_s']:>10.2f}{row['p50_s']:>10.3f}{row['p99_s']:>10.3f}")
    print(f"throughput ratio (batching / none): {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(), "args": vars(args), "rows": rows}, indent=2))
    print(out)


if __name__ == "__main__":
    main()
