"""pdserve's configuration: one pydantic model for the whole app, every field described.

Loaded from YAML (``PDConfig.from_yaml``), from a Serve config's ``args``, or built in code.
Cross-field rules (prefill and decode serve the same model with the same block size and PP
split, and TP sizes whose KV heads pair) are validators, so a bad config fails before anything
starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.service_config import API_KEY_ENV, KVTransferConfig, RouterConfig

__all__ = ["API_KEY_ENV", "DEMO_MODEL_DIR", "EngineConfig", "KVTransferConfig", "PDConfig",
           "PoolConfig", "RouterConfig", "checkpoint_kv_heads"]

# Where ``python -m deploy.demo_model`` builds the demo checkpoint: the default model.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo-llama"


def checkpoint_kv_heads(model: str) -> int | None:
    """The KV heads of a local checkpoint (its config.json), or None when it is not local."""
    import json

    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    hf = json.loads(path.read_text())
    hf = hf.get("text_config", hf)
    return hf.get("num_key_value_heads") or hf.get("num_attention_heads")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Strict):
    """The vLLM engine one replica runs."""

    model: str = Field(
        str(DEMO_MODEL_DIR),
        description="Local Hugging Face checkpoint directory (or a model id the engine can load).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in the `model` field; defaults to `model`."
    )
    dtype: str = Field("float32", description="Weights and activations dtype (vLLM's --dtype).")
    max_model_len: int = Field(1024, gt=0, description="Longest prompt plus output, in tokens.")
    block_size: int = Field(
        32, gt=0, description="Tokens per KV block (a multiple of 32 on the CPU backend)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU ranks) per TP group.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages.")
    enable_prefix_caching: bool = Field(True, description="vLLM's automatic prefix caching.")
    enforce_eager: bool = Field(
        True,
        description="Skip torch.compile and CUDA graphs: an engine starts in seconds instead of a "
        "minute, at some cost per step. The CPU demo wants it; set false on GPU clusters.",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences one engine step runs.")
    cpu_kvcache_space_gib: int = Field(
        1, ge=1, description="KV cache size of a CPU engine in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="How the engine runs its TP x PP workers (vLLM's "
        "--distributed-executor-backend): 'mp', processes on the replica's node; 'ray', Ray "
        "actors in the replica's placement group, which may span nodes. GPUs only for 'ray': "
        "vLLM's CPU build has no Ray executor. Unset, for replicas of more than one worker: "
        "'ray' on a cuda app, 'mp' on the CPU.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM engine flags, passed through as given."
    )

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def world_size(self) -> int:
        """Workers one replica runs: TP x PP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class PoolConfig(_Strict):
    """One pool of replicas (prefill or decode) and where it may run."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="The engine.")
    num_replicas: int = Field(1, ge=1, description="Replicas of this pool.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each replica asks for; the default is the pool's own "
        "resource (`pdserve_prefill` / `pdserve_decode`), which keeps the pools apart, unless "
        "the pool is placed by `label_selector`.",
    )
    num_cpus: float = Field(0, ge=0, description="Logical CPUs each replica asks Ray for.")
    num_gpus: float = Field(
        0, ge=0, description="GPUs each replica asks Ray for (TP x PP on a GPU pool). With the "
        "Ray executor each worker takes one GPU in the replica's placement group instead, so "
        "this must be 0 or TP x PP.",
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replicas need (e.g. H100), on GPU clusters."
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray label selector the pool's nodes must match, for the replica and each "
        "of its workers: e.g. {pdserve-pool: prefill} for nodes started with "
        "`ray start --labels pdserve-pool=prefill`, or {ray.io/accelerator-type: H100}.",
    )
    num_cpus_per_worker: float = Field(
        1, gt=0, description="CPUs each TP x PP worker reserves in the replica's placement "
        "group (replicas with more than one worker get one).",
    )
    pipeline_across_nodes: bool = Field(
        False,
        description="Let one replica's PP stages run on different nodes: its placement group "
        "packs onto as few nodes as hold it (Ray's PACK) instead of exactly one (STRICT_PACK). "
        "Give each node a multiple of TP devices so that each stage's TP workers share a node. "
        "Needs the Ray executor, so GPU pools only.",
    )
    cpu_cores: str | None = Field(
        None,
        description="CPU cores the engine's OpenMP threads are pinned to "
        "(VLLM_CPU_OMP_THREADS_BIND, e.g. '0' or '0-3'; one list per worker of a TP x PP "
        "replica, '|'-separated, e.g. '0|1'); the local default gives the two pools "
        "different cores.",
    )


class PDConfig(_Strict):
    """The whole disaggregated app."""

    prefill: PoolConfig = Field(
        default_factory=lambda: PoolConfig(cpu_cores="0"), description="Prefill pool."
    )
    decode: PoolConfig = Field(
        default_factory=lambda: PoolConfig(cpu_cores="1"), description="Decode pool."
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="Ingress router.")
    kv_transfer: KVTransferConfig = Field(
        default_factory=KVTransferConfig, description="KV transfer between the pools."
    )
    app_name: str = Field("pdserve", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the app.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the engines run.")
    enable_metrics: bool = Field(
        True, description="Export the engines', the KV transfer's and the router's metrics "
        "through Ray (Prometheus, the Ray dashboard). Off, only what routing needs is kept.")
    serving_cores: str | None = Field(
        None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="CPU cores (e.g. '1' or '1-3,6') for every process of a Ray cluster that "
        "pdserve starts itself but the engines: Ray's own processes, the HTTP proxy, the router "
        "and the replicas; each engine (its EngineCore and workers) runs on its pool's "
        "cpu_cores. On a small machine this keeps the prefill core for prefills. None: the "
        "OS spreads them over every core. Ignored when joining a running cluster.")

    @model_validator(mode="after")
    def _pools_agree(self) -> PDConfig:
        """Same model, block size, dtype, length and PP split; TP may differ when the model's
        KV heads split over both TP sizes (each decode rank pulls its own heads)."""
        p, d = self.prefill.engine, self.decode.engine
        for name in ("model", "block_size", "dtype", "max_model_len", "pipeline_parallel_size"):
            if getattr(p, name) != getattr(d, name):
                raise ValueError(
                    f"prefill and decode must agree on {name}: "
                    f"{getattr(p, name)!r} != {getattr(d, name)!r}"
                )
        if p.name != d.name:
            raise ValueError(f"prefill and decode serve different names: {p.name} != {d.name}")
        if p.tensor_parallel_size != d.tensor_parallel_size:
            from kvtransfer.heads import pair_problem

            heads = checkpoint_kv_heads(p.model)
            problem = None if heads is None else pair_problem(
                heads, p.tensor_parallel_size, d.tensor_parallel_size)
            if problem:
                raise ValueError(f"prefill TP {p.tensor_parallel_size} and decode TP "
                                 f"{d.tensor_parallel_size} cannot exchange KV heads: {problem}")
        return self

    @model_validator(mode="after")
    def _executors_fit_the_device(self) -> PDConfig:
        """Resolve each engine's executor backend, then check the placement it allows."""
        for role in ("prefill", "decode"):
            pool = getattr(self, role)
            engine = pool.engine
            if engine.distributed_executor_backend is None and engine.world_size > 1:
                # Explicit on the CPU too: vLLM picks 'ray' itself inside a placement group.
                engine.distributed_executor_backend = "ray" if self.device == "cuda" else "mp"
            is_ray = engine.distributed_executor_backend == "ray"
            if is_ray and self.device == "cpu":
                raise ValueError(f"{role}: vLLM's CPU build has no Ray executor; a CPU "
                                 "replica's workers run as processes on its node ('mp')")
            if pool.pipeline_across_nodes and not (is_ray and engine.pipeline_parallel_size > 1):
                raise ValueError(f"{role}: pipeline_across_nodes needs PP > 1 and the Ray "
                                 "executor (a cuda app)")
            if self.device == "cpu" and engine.pipeline_parallel_size > 1 and \
                    engine.enforce_eager:
                # vLLM's CPU runner makes the buffers later stages receive in its compile
                # warm-up, which eager mode skips: the second stage then fails its first step.
                raise ValueError(f"{role}: pipeline parallelism on the CPU needs "
                                 "enforce_eager: false")
            cores = pool.cpu_cores
            if self.device == "cpu" and cores is not None and engine.world_size > 1 and \
                    len(cores.split("|")) != engine.world_size:
                raise ValueError(f"{role}: a CPU replica of {engine.world_size} workers needs "
                                 f"one core list per worker in cpu_cores, '|'-separated "
                                 f"(e.g. '0|1'), not {cores!r}")
            if is_ray and pool.num_gpus not in (0, engine.world_size):
                raise ValueError(f"{role}: with the Ray executor each of the {engine.world_size} "
                                 f"workers takes one GPU; num_gpus must be 0 or "
                                 f"{engine.world_size}, not {pool.num_gpus}")
        return self

    @property
    def model_name(self) -> str:
        return self.prefill.engine.name

    @classmethod
    def from_yaml(cls, path: str | Path) -> PDConfig:
        return cls.from_args({"config_file": str(path)})

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> PDConfig:
        """From a Serve config's application ``args``: inline fields, and optionally a
        ``config_file`` (YAML) whose top-level fields the inline ones override."""
        import yaml

        data = dict(args or {})
        path = data.pop("config_file", None)
        if path is not None:
            data = {**(yaml.safe_load(Path(path).read_text()) or {}), **data}
        return cls.model_validate(data)
