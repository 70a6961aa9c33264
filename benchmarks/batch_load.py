"""What requests of several prompts do to the other streams of a running server.

``python -m benchmarks.batch_load [--url http://127.0.0.1:8000] [--runs 1]``

Against a server that is already up (``python -m deploy.serve_local --model
models/bench-llama``, say), vLLM's own bench client sends single prompts (random, 200 tokens
in, 64 out, 1.5 requests/s, 60 requests, seed 7) while this script sends, every 4 s, one
completion of 8 random prompts of 300 token ids (4 output tokens). It prints the single
prompts' TTFT, TPOT and ITL at p50/p90/p99, how many of the batches came back 200, and the
router's local prefills by reason (``GET /routing``). Run it against two builds in turn to
compare them; the machine is noisy, so use ``--runs`` and report each run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.serve_compare import PERCENTILES, load_result, parse_client_args

BATCH_PROMPTS, BATCH_TOKENS, BATCH_PERIOD_S = 8, 300, 4.0
CLIENT = ("--dataset-name", "random", "--random-input-len", "200", "--random-output-len", "64",
          "--num-prompts", "60", "--request-rate", "1.5", "--seed", "7", "--ignore-eos")
COLUMNS = [f"p{p}_{m}_ms" for m in ("ttft", "tpot", "itl") for p in PERCENTILES]


async def send_batches(url: str, model: str, stop: threading.Event) -> list[int]:
    """One batch every ``BATCH_PERIOD_S`` until ``stop``; their HTTP statuses."""
    rng = random.Random(5)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        sent = []
        while not stop.is_set():
            prompts = [[rng.randrange(3, 2000) for _ in range(BATCH_TOKENS)]
                       for _ in range(BATCH_PROMPTS)]
            sent.append(asyncio.ensure_future(client.post("/v1/completions", json={
                "model": model, "prompt": prompts, "max_tokens": 4, "ignore_eos": True})))
            await asyncio.sleep(BATCH_PERIOD_S)
        return [r.status_code for r in await asyncio.gather(*sent)]


def one_run(url: str) -> tuple[dict[str, float], list[int], dict]:
    from vllm.benchmarks.serve import main as bench

    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    stop = threading.Event()
    statuses: list[int] = []
    loader = threading.Thread(
        target=lambda: statuses.extend(asyncio.run(send_batches(url, model, stop))))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argv = [*CLIENT, "--backend", "vllm", "--base-url", url, "--model", model,
                "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles",
                ",".join(map(str, PERCENTILES)), "--goodput", "ttft:2000", "tpot:100",
                "--save-result", "--save-detailed", "--result-dir", tmp,
                "--result-filename", result.name, "--disable-tqdm"]
        loader.start()
        time.sleep(0.5)
        try:
            bench(parse_client_args(argv))
        finally:
            stop.set()
            loader.join()
        values = load_result(result).values
    return values, statuses, httpx.get(f"{url}/routing").json()["local_prefills"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    rows = [one_run(args.url) for _ in range(args.runs)]
    print("run | " + " | ".join(COLUMNS) + " | batches ok | local prefills (cumulative)")
    for i, (values, statuses, local) in enumerate(rows, 1):
        print(f"{i} | " + " | ".join(f"{values[c]:.1f}" for c in COLUMNS) +
              f" | {statuses.count(200)}/{len(statuses)} | {local}")


if __name__ == "__main__":
    main()
