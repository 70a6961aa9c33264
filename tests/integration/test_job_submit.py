"""`ray job submit` deploys pdserve to a running cluster and returns; the app then serves.

A head node is started with `ray start` (its own ports, both pool resources), the job runs
`python -m deploy.cli serve` from the uploaded working directory (the job's entrypoint gets
RAY_ADDRESS, so the command deploys and returns), and a completion sent afterwards must equal
a plain engine's. `ray stop` at the end stops every Ray process of this user on the machine:
run this module on its own, not beside other Ray clusters. About 2 minutes here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cluster.ports import free_port_block
from tests.integration.support import completion_body

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
SERVE = Path(sys.executable).with_name("serve")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _ray(*args: str, timeout_s: float = 120, command: Path = RAY
         ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60's `ray start` turns token authentication on; its job CLI sends the token
    # (~/.ray/auth_token) only when told to.
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    run = subprocess.run([str(command), *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout_s)
    assert run.returncode == 0, \
        f"{command.name} {args[0]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _stray_engines() -> set[int]:
    """vLLM engine processes on this machine that are not this test process's own (the
    reference engine)."""
    import psutil

    own = {p.pid for p in psutil.Process().children(recursive=True)}
    return {p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.pid not in own and "VLLM::" in " ".join(p.info["cmdline"] or [p.info["name"]])}


@pytest.fixture
def head_node():
    """A one-node cluster started the way an operator would; yields its dashboard URL."""
    import ray

    if ray.is_initialized():  # an in-process cluster of another module: `ray stop` ends it
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    gcs_port, dashboard_port = free_port_block("127.0.0.1", 1), free_port_block("127.0.0.1", 1)
    _ray("start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2",
         "--resources=" + json.dumps({"pdserve_prefill": 1, "pdserve_decode": 1}),
         "--disable-usage-stats")
    address = f"http://127.0.0.1:{dashboard_port}"
    engines_before = _stray_engines()
    try:
        yield address
    finally:
        # Serve's own shutdown stops each replica's engine; `ray stop --force` alone would kill
        # the replicas and orphan their engine processes.
        _ray("shutdown", "-y", f"--address={address}", command=SERVE)
        _ray("stop", "--force")
    assert wait_for(lambda: not _stray_engines() - engines_before), \
        f"engine processes outlived the cluster: {_stray_engines() - engines_before}"


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


async def test_a_submitted_job_deploys_and_the_app_answers(
        head_node: str, engine_config, reference_outputs) -> None:
    http_port, grpc_port = free_port_block("127.0.0.1", 1), free_port_block("127.0.0.1", 1)
    job = _ray("job", "submit", f"--address={head_node}", "--working-dir", ".", "--",
               sys.executable, "-m", "deploy.cli", "serve", "--model", engine_config.model,
               "--port", str(http_port), "--grpc-port", str(grpc_port), timeout_s=600)
    assert "pdserve deployed" in job.stdout, job.stdout[-4000:]
    assert "succeeded" in job.stdout.lower()  # the job returned: Serve keeps the app running

    body = completion_body(engine_config, "def hello():")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=180) as c:
        response = await c.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == await reference_outputs(body)
