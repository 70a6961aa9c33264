"""PDConfig: defaults, cross-pool rules, strictness, YAML plus inline overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import DEMO_MODEL_DIR, PDConfig
from router.policies import make_policy


def test_defaults_validate() -> None:
    cfg = PDConfig()
    assert cfg.prefill.engine.model == str(DEMO_MODEL_DIR)
    assert cfg.model_name == str(DEMO_MODEL_DIR)
    assert cfg.prefill.engine.block_size == cfg.decode.engine.block_size == 32
    assert (cfg.prefill.cpu_cores, cfg.decode.cpu_cores) == ("0", "1")  # different cores
    assert cfg.device == "cpu"
    assert PDConfig.model_validate(cfg.model_dump()) == cfg


def test_served_model_name_is_the_model_name() -> None:
    engine = {"model": "/models/llama", "served_model_name": "llama-8b"}
    cfg = PDConfig.model_validate({"prefill": {"engine": engine}, "decode": {"engine": engine}})
    assert cfg.model_name == "llama-8b"


@pytest.mark.parametrize(
    ("field", "prefill_value", "decode_value"),
    [
        ("model", "/models/a", "/models/b"),
        ("block_size", 16, 32),
        ("pipeline_parallel_size", 1, 2),
        ("dtype", "bfloat16", "float32"),
        ("max_model_len", 2048, 1024),
    ],
)
def test_pools_must_agree(field: str, prefill_value: Any, decode_value: Any) -> None:
    data = {
        "prefill": {"engine": {field: prefill_value}},
        "decode": {"engine": {field: decode_value}},
    }
    with pytest.raises(ValidationError) as info:
        PDConfig.model_validate(data)
    message = str(info.value)
    assert f"prefill and decode must agree on {field}" in message
    assert f"{prefill_value!r} != {decode_value!r}" in message


def write_checkpoint(path: Path, kv_heads: int) -> str:
    path.mkdir()
    (path / "config.json").write_text(
        f'{{"num_attention_heads": 8, "num_key_value_heads": {kv_heads}}}')
    return str(path)


@pytest.mark.parametrize(("kv_heads", "prefill_tp", "decode_tp"),
                         [(8, 2, 4), (8, 4, 1), (2, 4, 1), (1, 1, 2)])
def test_tp_sizes_may_differ_when_the_kv_heads_split(
        tmp_path: Path, kv_heads: int, prefill_tp: int, decode_tp: int) -> None:
    model = write_checkpoint(tmp_path / "m", kv_heads)
    cfg = PDConfig.model_validate({
        "prefill": {"engine": {"model": model, "tensor_parallel_size": prefill_tp}},
        "decode": {"engine": {"model": model, "tensor_parallel_size": decode_tp}}})
    assert cfg.prefill.engine.tensor_parallel_size == prefill_tp


def test_tp_sizes_whose_heads_do_not_split_are_refused(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "m", 6)
    with pytest.raises(ValidationError, match="prefill: 6 KV heads do not split over TP 4"):
        PDConfig.model_validate({
            "prefill": {"engine": {"model": model, "tensor_parallel_size": 4}},
            "decode": {"engine": {"model": model, "tensor_parallel_size": 2}}})


@pytest.mark.parametrize(("pool", "message"), [
    ({"engine": {"pipeline_parallel_size": 2}, "cpu_cores": "0|1"}, "enforce_eager: false"),
    ({"engine": {"tensor_parallel_size": 2}, "cpu_cores": "0"}, "one core list per worker"),
    ({"engine": {"tensor_parallel_size": 2}, "cpu_cores": "0|1|1"}, "one core list per worker"),
])
def test_cpu_parallel_replicas_need_what_vllm_cpu_needs(pool: dict[str, Any],
                                                       message: str) -> None:
    engine = pool["engine"]
    with pytest.raises(ValidationError, match=message):
        PDConfig.model_validate({"prefill": pool, "decode": {"engine": engine}})
    ok = {**pool, "cpu_cores": "0|1", "engine": {**engine, "enforce_eager": False}}
    PDConfig.model_validate({"prefill": ok, "decode": {"engine": ok["engine"]}})


def test_one_sided_block_size_disagrees_with_the_default() -> None:
    with pytest.raises(ValidationError, match="agree on block_size: 16 != 32"):
        PDConfig.model_validate({"prefill": {"engine": {"block_size": 16}}})


def test_pools_must_serve_the_same_name() -> None:
    data = {
        "prefill": {"engine": {"served_model_name": "a"}},
        "decode": {"engine": {"served_model_name": "b"}},
    }
    with pytest.raises(ValidationError, match="different names: a != b"):
        PDConfig.model_validate(data)


@pytest.mark.parametrize(
    "data",
    [
        {"prefil": {}},
        {"prefill": {"replicas": 2}},
        {"decode": {"engine": {"blocksize": 16}}},
        {"router": {"policy": "x"}},
        {"kv_transfer": {"lease": 3}},
    ],
    ids=["top", "pool", "engine", "router", "kv_transfer"],
)
def test_unknown_fields_are_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PDConfig.model_validate(data)


@pytest.mark.parametrize(
    "data",
    [
        {"device": "tpu"},
        {"prefill": {"num_replicas": 0}},
        {"prefill": {"engine": {"block_size": 0}}, "decode": {"engine": {"block_size": 0}}},
        {"kv_transfer": {"lease_s": 0}},
    ],
    ids=["device", "replicas", "block-size", "lease"],
)
def test_out_of_range_values_are_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PDConfig.model_validate(data)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_from_args_with_a_config_file_and_overrides(tmp_path: Path) -> None:
    engine = {"model": "/models/tiny", "block_size": 16}
    path = write_yaml(tmp_path / "pd.yaml", {
        "app_name": "from-file",
        "route_prefix": "/v",
        "prefill": {"num_replicas": 3, "engine": engine},
        "decode": {"num_replicas": 2, "engine": engine},
        "kv_transfer": {"lease_s": 5},
    })
    cfg = PDConfig.from_args({
        "config_file": str(path),
        "app_name": "inline",
        "decode": {"num_replicas": 4, "engine": engine},
    })
    assert cfg.app_name == "inline"  # inline wins
    assert cfg.route_prefix == "/v"  # file value kept
    assert cfg.prefill.num_replicas == 3
    assert cfg.decode.num_replicas == 4
    assert cfg.prefill.engine.block_size == cfg.decode.engine.block_size == 16
    assert cfg.model_name == "/models/tiny"
    assert cfg.kv_transfer.lease_s == 5.0


def test_from_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "pd.yaml", {"router": {"prefill_timeout_s": 7.5}})
    cfg = PDConfig.from_yaml(path)
    assert cfg.router.prefill_timeout_s == 7.5
    assert cfg.app_name == "pdserve"


def test_from_args_with_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert PDConfig.from_args({"config_file": str(path)}) == PDConfig()


def test_from_args_without_args() -> None:
    assert PDConfig.from_args(None) == PDConfig()
    assert PDConfig.from_args({"app_name": "x"}).app_name == "x"


def test_from_args_validates_the_merged_config(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "pd.yaml", {"prefill": {"engine": {"block_size": 64}}})
    with pytest.raises(ValidationError, match="agree on block_size: 64 != 32"):
        PDConfig.from_args({"config_file": str(path)})
    fixed = PDConfig.from_args({
        "config_file": str(path), "decode": {"engine": {"block_size": 64}},
    })
    assert fixed.decode.engine.block_size == 64


def test_from_args_does_not_change_its_argument(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "pd.yaml", {"app_name": "f"})
    args = {"config_file": str(path), "route_prefix": "/x"}
    PDConfig.from_args(args)
    assert args == {"config_file": str(path), "route_prefix": "/x"}


def test_decode_policy_settings_keep_the_decode_pools_defaults() -> None:
    """Setting one of cache_cost's decode settings keeps the others the decode pool needs
    (a whole-dict replacement would fall back to the prefill pool's defaults); another
    policy gets none of them, also when switched to in a saved config."""
    cfg = PDConfig.model_validate({"router": {"decode_policy_kwargs": {"load_bound_abs_s": 0.5}}})
    kwargs = cfg.router.policy_kwargs("decode")
    assert kwargs["load_bound_abs_s"] == 0.5
    assert kwargs["running_seq_tokens"] == PDConfig().router.policy_kwargs("decode")[
        "running_seq_tokens"] > 0
    assert PDConfig.model_validate(cfg.model_dump()) == cfg
    saved = PDConfig().model_dump()
    saved["router"]["decode_policy"] = "least_loaded"
    other = PDConfig.model_validate(saved)
    assert other.router.policy_kwargs("decode") == {}
    make_policy("least_loaded", **other.router.policy_kwargs("decode"))
