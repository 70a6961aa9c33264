"""The app on a three-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

The head node runs Serve's controller, proxy and the router; a prefill node has the
``pdserve_prefill`` resource and a decode node ``pdserve_decode``. Each worker node has its own
loopback address (Ray's own multi-node tests do the same), so the KV cache really moves from one
node's address to another's. The prefill replica runs TP=2 (two worker processes in the
placement group Ray Serve makes for it), the decode replica TP=1: its one worker pulls each
head from the prefill worker holding it. Checked: every replica runs on its pool's node (the
node id its ``health()`` reports), both prefill workers report their node's address in the
transfer parameters, and greedy completions equal a plain engine's, each prompt loaded by
transfer.

Run alone (it starts its own cluster), about 2 minutes here:

    .venv/bin/python -m pytest tests/integration/test_multinode.py -q
"""

from __future__ import annotations

import os
import secrets

import httpx
import pytest

from cluster.pools import pool_resource
from tests.integration.support import (
    assert_all_loaded,
    completion_body,
    differing_outputs,
    make_prompts,
    one_pair_config,
)

APP = "pdserve-multinode"
NODE_IPS = {"prefill": "127.0.0.2", "decode": "127.0.0.3"}
NUM_PROMPTS = 6

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def nodes():
    """Head, prefill and decode nodes; yields {role: the node's Ray id}."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's cluster
        serve.shutdown()
        ray.shutdown()
    cluster = Cluster()
    cluster.add_node(num_cpus=1)  # the head: Serve's controller, its proxy, the router
    node_ids = {}
    for role, ip in NODE_IPS.items():
        node = cluster.add_node(num_cpus=2 if role == "prefill" else 1, node_ip_address=ip,
                                resources={pool_resource(role): 1})
        node_ids[role] = node.node_id
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield node_ids
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def app(nodes, engine_config):
    """The app deployed on ``nodes``, its HTTP proxy on the head only; yields its base URL."""
    from ray import serve

    from cluster.config import PDConfig
    from cluster.ports import free_port_block
    from deploy.app import build_app_from_config

    base = one_pair_config(engine_config, APP).model_dump()
    base["prefill"].update(cpu_cores="0|1")
    base["prefill"]["engine"].update(tensor_parallel_size=2)
    cfg = PDConfig.model_validate(base)
    # The secret where the app is built: the test may then release a hold it made itself.
    previous = os.environ.get("PDSERVE_KV_SECRET")
    os.environ["PDSERVE_KV_SECRET"] = secrets.token_hex(32)
    http_port = free_port_block("127.0.0.1", 1)
    try:
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app_from_config(cfg), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{http_port}"
    finally:
        if previous is None:
            os.environ.pop("PDSERVE_KV_SECRET", None)
        else:
            os.environ["PDSERVE_KV_SECRET"] = previous


def handle(role: str):
    from ray import serve

    return serve.get_deployment_handle(role, APP)


async def test_each_pool_runs_on_its_own_node(app, nodes) -> None:
    for role in ("prefill", "decode"):
        health = await handle(role).health.remote()
        assert health["node_id"] == nodes[role], (role, health, nodes)
    routing = await handle("prefill").record_routing_stats.remote()
    assert routing["kv_events_endpoint"].startswith(f"tcp://{NODE_IPS['prefill']}:")


async def test_prefill_workers_report_their_nodes_address(app, engine_config,
                                                          vocab_size) -> None:
    from kvtransfer.release import release_transfer

    prompt = make_prompts(engine_config, vocab_size, seed=32)[5]  # token ids, as the router sends
    body = completion_body(engine_config, prompt)
    out = await handle("prefill").prefill.remote("completion", body, "multinode-probe")
    params = out["kv_transfer_params"]
    assert params["tp_size"] == 2
    [(host, port), (host_1, port_1)] = params["remote_addresses"]
    assert host == host_1 == NODE_IPS["prefill"] and port != port_1
    assert release_transfer(params)  # nobody will pull it


async def test_parity_across_nodes(app, engine_config, vocab_size, reference_outputs) -> None:
    decode_before = await handle("decode").stats.remote()
    prompts = make_prompts(engine_config, vocab_size, seed=31)
    step = max(1, len(prompts) // NUM_PROMPTS)
    chosen = prompts[::step][:NUM_PROMPTS]  # one token up to many blocks
    async with httpx.AsyncClient(base_url=app, timeout=180) as client:
        mismatches = await differing_outputs(client, engine_config, chosen, reference_outputs)
    assert not mismatches, f"outputs differ for prompt lengths {mismatches}"
    assert_all_loaded(decode_before, await handle("decode").stats.remote(), len(chosen))
