"""Shared pieces of the real-stack tests: prompts of exact lengths, expected byte counts,
and a worker-side function that corrupts held KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from cluster.config import EngineConfig

if TYPE_CHECKING:
    from cluster.config import PDConfig

MAX_TOKENS = 8
# Pairing settings that send every request through a prefill replica while one is healthy.
ALWAYS_TRANSFER = {"local_prefill_max_uncached_tokens": 0, "local_prefill_cost_factor": 0}
FIRST_TOKEN_ID = 3  # 0-2 are <unk>, <s>, </s>


def prompt_lengths(cfg: EngineConfig) -> list[int]:
    """One token, one block, several blocks, partial last blocks, and the longest allowed."""
    b = cfg.block_size
    longest = cfg.max_model_len - MAX_TOKENS
    return [1, 2, 7, b - 1, b, b + 1, 2 * b, 2 * b + 5, 3 * b - 1, 4 * b, 5 * b + 17, 7 * b,
            8 * b + 1, 11 * b + 3, 13 * b, 16 * b - 2, 19 * b + 9, 24 * b, longest - 1, longest]


def make_prompts(cfg: EngineConfig, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token-id prompts (no shared prefixes) of ``prompt_lengths``."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]
            for n in prompt_lengths(cfg)]


def completion_body(cfg: EngineConfig, prompt: list[int] | str, **extra: Any) -> dict[str, Any]:
    return {"model": cfg.name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, **extra}


def completion_request(model: str, prompt: list[int] | str, max_tokens: int = MAX_TOKENS) -> Any:
    """The gRPC twin of ``completion_body``: a greedy ``pdserve.v1.CompletionRequest``."""
    from router.grpc_api import pdserve_pb2 as pb

    sampling = pb.Sampling(temperature=0, ignore_eos=True)
    if isinstance(prompt, str):
        return pb.CompletionRequest(model=model, prompt=prompt, max_tokens=max_tokens,
                                    sampling=sampling)
    return pb.CompletionRequest(model=model, prompt_token_ids=pb.TokenIds(ids=prompt),
                                max_tokens=max_tokens, sampling=sampling)


def bytes_per_block(model_dir: str, cfg: EngineConfig) -> int:
    """K and V of every layer for one block, from the checkpoint's own config."""
    import json
    from pathlib import Path

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]
    return (2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim
            * cfg.block_size * dtype_bytes)


def num_blocks(num_tokens: int, cfg: EngineConfig) -> int:
    return math.ceil(num_tokens / cfg.block_size)


def assert_all_loaded(before: dict, after: dict, num_requests: int) -> None:
    """Every one of ``num_requests`` prompts was loaded by transfer, none recomputed."""
    def delta(name: str) -> int:
        return after[name] - before[name]

    assert delta("num_loads") == num_requests, (before, after)
    assert delta("num_failed_loads") == 0, (before, after)
    assert delta("prompt_tokens_computed") <= num_requests, (before, after)
    assert delta("num_bytes_received") > 0


async def differing_outputs(client: Any, cfg: EngineConfig, prompts: list[list[int]],
                            reference_outputs: Callable[[dict], Any]) -> list[int]:
    """Send each prompt alone (``client``: an httpx client on the app); the lengths of those
    whose greedy completion differs from the plain engine's."""
    mismatches = []
    for prompt in prompts:
        body = completion_body(cfg, prompt)
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        if r.json()["choices"][0]["text"] != await reference_outputs(body):
            mismatches.append(len(prompt))
    return mismatches


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0,
                     interval_s: float = 0.2) -> Any:
    """Poll an async or plain predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval_s)


def corrupt_held_blocks(worker: Any, transfer_id: str) -> int:
    """Runs inside a prefill worker (``collective_rpc``): overwrite the blocks held for
    ``transfer_id`` with noise; return how many blocks were overwritten."""
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    side = get_kv_transfer_group().worker_side
    hold = side.holds._holds[transfer_id]
    caches = side.producer.kv_caches
    for layout in side.producer.layout.layers:
        tensor = caches[layout.name]
        index = torch.tensor(hold.block_ids, dtype=torch.long)
        noise = torch.randn_like(tensor.index_select(layout.block_dim, index)) * 10
        tensor.index_copy_(layout.block_dim, index, noise)
    return len(hold.block_ids)


def one_pair_config(engine: EngineConfig, app_name: str) -> PDConfig:
    """One prefill and one decode replica on cores 0 and 1, every single-prompt request
    transferred (these tests check the transfer), a 20 s lease."""
    from cluster.config import PDConfig, PoolConfig

    return PDConfig(
        prefill=PoolConfig(engine=engine, cpu_cores="0"),
        decode=PoolConfig(engine=engine, cpu_cores="1"),
        kv_transfer={"lease_s": 20, "timeout_s": 10},
        router={"pairing": ALWAYS_TRANSFER},
        app_name=app_name,
    )


@dataclasses.dataclass(frozen=True)
class Deployment:
    url: str  # HTTP base URL
    grpc_target: str  # host:port of Ray Serve's gRPC proxy


@contextlib.contextmanager
def deployed(cfg: PDConfig) -> Iterator[Deployment]:
    """Deploy ``cfg`` on a local Ray cluster started for it (with the pool resources it needs),
    serving HTTP and gRPC; yield where, and shut Serve and Ray down afterwards."""
    import ray
    from ray import serve

    from cluster.local import connect_or_start
    from cluster.ports import free_port_block
    from deploy.app import build_app_from_config, grpc_options

    if ray.is_initialized():  # another module's cluster may lack this one's resources
        serve.shutdown()
        ray.shutdown()
    connect_or_start(cfg)
    try:
        http_port = free_port_block("127.0.0.1", 1)
        grpc_port = free_port_block("127.0.0.1", 1)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options=grpc_options(grpc_port))
        serve.run(build_app_from_config(cfg), name=cfg.app_name, route_prefix="/")
        yield Deployment(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    finally:
        serve.shutdown()
        ray.shutdown()
