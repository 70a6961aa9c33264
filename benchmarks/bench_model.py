"""Build the benchmark model: a Llama of about 29M parameters from a fixed seed, in bfloat16.

The demo model (deploy/demo_model.py) is too small for prefill and decode to get in each
other's way; this one is large enough that they do on one CPU core (a 1,000-token prefill takes
about half a second, a decode step about 18 ms). It uses the demo model's tokenizer (2,048
tokens) and knows no language either.

    python -m benchmarks.bench_model [--out models/bench-llama]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cluster.config import DEMO_MODEL_DIR
from deploy.demo_model import build_llama, build_tokenizer, is_built

logger = logging.getLogger(__name__)

BENCH_MODEL_DIR = DEMO_MODEL_DIR.parent / "bench-llama"
SEED = 4321
MAX_POSITIONS = 4096
# Llama shape: 8 layers of hidden 512, 8 heads of 64 (as many KV heads), MLP 1536 wide.
SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64}


def ensure_bench_model(out_dir: Path = BENCH_MODEL_DIR) -> Path:
    """Build the benchmark model into ``out_dir`` unless it is already there; return the path."""
    if is_built(out_dir):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir, max_positions=MAX_POSITIONS)
    num_params = build_llama(out_dir, vocab_size, seed=SEED, dtype="bfloat16",
                             max_positions=MAX_POSITIONS, shape=SHAPE)
    (out_dir / "pdserve-bench.json").write_text(json.dumps({"seed": SEED,
                                                            "num_parameters": num_params}))
    logger.info("built the benchmark model (%d parameters) in %s", num_params, out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_MODEL_DIR, help="output directory")
    args = parser.parse_args()
    print(ensure_bench_model(args.out))


if __name__ == "__main__":
    main()
