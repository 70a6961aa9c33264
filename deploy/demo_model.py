"""Build the demo model: a tiny Llama checkpoint from a fixed seed and a tokenizer trained here.

No model hub is needed. The tokenizer is a byte-level BPE trained on the help texts that ship
with Python (``pydoc_data``); the weights are drawn from a fixed seed. The model knows no
language, but it is a real Llama checkpoint that vLLM loads like any other, and its greedy
output depends on every token of the prompt, which is what the tests need.

    python -m deploy.demo_model [--out models/demo-llama]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from cluster.config import DEMO_MODEL_DIR

logger = logging.getLogger(__name__)

SEED = 1234
VOCAB_SIZE = 2048
MAX_POSITIONS = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# Tools are printed as a JSON line, as real models' templates put them in the prompt.
CHAT_TEMPLATE = (
    "{% if tools %}<s>tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _corpus() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def build_tokenizer(out_dir: Path, max_positions: int = MAX_POSITIONS) -> int:
    """Train the tokenizer, save it in Hugging Face format; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


# The demo model's shape and weight scale. Wide weights keep the top two logits apart, so greedy
# decoding does not hinge on rounding differences between batch shapes.
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32,
         "initializer_range": 0.2}


def build_llama(out_dir: Path, vocab_size: int, *, seed: int, dtype: str, max_positions: int,
                shape: dict[str, Any]) -> int:
    """Draw a Llama's weights from ``seed`` and save the checkpoint as safetensors in ``dtype``
    (``float32`` or ``bfloat16``); return its number of parameters. ``shape``: ``LlamaConfig``
    fields (sizes, and ``initializer_range`` if not the default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model.num_parameters()


def build_model(out_dir: Path, vocab_size: int) -> None:
    """Draw the demo model's weights from the fixed seed and save the checkpoint."""
    build_llama(out_dir, vocab_size, seed=SEED, dtype="float32", max_positions=MAX_POSITIONS,
                shape=SHAPE)


def is_built(out_dir: Path) -> bool:
    return (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists()


def ensure_demo_model(out_dir: Path = DEMO_MODEL_DIR) -> Path:
    """Build the demo model into ``out_dir`` unless it is already there (then only bring its
    chat template up to date); return the path."""
    if is_built(out_dir):
        template = out_dir / "chat_template.jinja"
        if template.exists() and template.read_text() != CHAT_TEMPLATE:
            template.write_text(CHAT_TEMPLATE)
            logger.info("updated the demo model's chat template in %s", out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir)
    build_model(out_dir, vocab_size)
    (out_dir / "pdserve-demo.json").write_text(json.dumps({"seed": SEED}))
    logger.info("built the demo model in %s", out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="output directory")
    args = parser.parse_args()
    print(ensure_demo_model(args.out))


if __name__ == "__main__":
    main()
