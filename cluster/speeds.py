"""An engine's own measured speeds, which the router predicts with (``ReplicaLoad``).

Fed by vLLM's per-step statistics (``IterationStats``), in the engine's stat logger:

- ``decode_step_s``: the mean inter-token latency of the steps that computed no prompt token,
  i.e. how long one decode step takes at the current batch;
- ``prefill_tokens_per_s``: prompt tokens computed per second of prefill, from every finished
  request that computed at least ``min_prefill_tokens`` of its prompt (vLLM's own
  ``prefill_time``, from first scheduled to first token; a prompt loaded by KV transfer
  computes about one token and is left out).

Both are exponential moving averages (weight ``alpha`` for the newest sample); 0 until measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class EngineSpeeds:
    alpha: float = 0.1
    min_prefill_tokens: int = 64
    decode_step_s: float = 0.0
    prefill_tokens_per_s: float = 0.0

    def _average(self, current: float, sample: float) -> float:
        return sample if current == 0.0 else current + self.alpha * (sample - current)

    def record(self, iteration_stats: Any) -> None:
        """Take one engine step's ``vllm.v1.metrics.stats.IterationStats``."""
        latencies = iteration_stats.inter_token_latencies_iter
        if latencies and iteration_stats.prompt_token_stats.computed == 0:
            step_s = sum(latencies) / len(latencies)
            self.decode_step_s = self._average(self.decode_step_s, step_s)
        for finished in iteration_stats.finished_requests:
            computed = finished.num_prompt_tokens - finished.num_cached_tokens
            if computed >= self.min_prefill_tokens and finished.prefill_time > 0:
                speed = computed / finished.prefill_time
                self.prefill_tokens_per_s = self._average(self.prefill_tokens_per_s, speed)
