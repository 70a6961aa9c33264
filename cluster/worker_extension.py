"""pdserve's vLLM worker extension (``--worker-extension-cls
cluster.worker_extension.PDWorkerExtension``, loaded by engines that run the KV connector).

vLLM mixes the class into every worker, so the engine can call its methods on all of them with
``collective_rpc``:

- ``pdserve_transfer_health``: None when the worker's KV transfer threads are alive, else why
  not (``PDWorker.health()``); ``cluster.worker_health`` sends it as a health probe.
- ``pdserve_warm_up``: compiles what vLLM's sampler compiles on its first use (the rank of a
  token among the logprobs, ``torch.compile``d), at start-up instead of inside the first step
  that asks for logprobs. That compile takes seconds on a CPU (3 to 4 s here, far more on a
  busy machine); in a step it stalls every running sequence and the workers' answers to health
  probes, and a replica whose workers do not answer is replaced.

Only these methods may live here: vLLM refuses an extension with any attribute the worker
class already has.
"""

from __future__ import annotations

import time

PROBE_METHOD = "pdserve_transfer_health"
WARM_UP_METHOD = "pdserve_warm_up"
EXTENSION_CLS = "cluster.worker_extension.PDWorkerExtension"  # vLLM's dotted qualname form


class PDWorkerExtension:
    """vLLM worker extension: see the module docstring."""

    def pdserve_transfer_health(self) -> str | None:
        """None when this worker's KV transfer threads are alive, else the reason."""
        from vllm.distributed.kv_transfer.kv_transfer_state import (
            get_kv_transfer_group,
            has_kv_transfer_group,
        )

        if not has_kv_transfer_group():
            return "the KV connector is not initialized on this worker"
        worker_side = getattr(get_kv_transfer_group(), "worker_side", None)
        if worker_side is None:
            return "the KV connector has no worker side on this worker"
        return worker_side.health()

    def pdserve_warm_up(self) -> float:
        """Run the sampler's logprob gathering once on this worker's device, as a step that
        asks for logprobs does; return the seconds it took."""
        import torch
        from vllm.v1.sample.sampler import Sampler

        start = time.perf_counter()
        vocab_size = self.model_config.get_vocab_size()  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        # Under inference mode, as the model runner samples: torch.compile guards on it, and a
        # graph compiled outside it would be compiled again in the first step.
        with torch.inference_mode():
            logprobs = torch.zeros(2, vocab_size, dtype=torch.float32, device=device)
            token_ids = torch.zeros(2, dtype=torch.int64, device=device)
            Sampler.gather_logprobs(logprobs, 1, token_ids)
        return time.perf_counter() - start
