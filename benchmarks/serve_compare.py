"""Does disaggregation pay on this machine? pdserve against colocated vLLM engines, same cores.

Both sides get the same two cores and the same requests from vLLM's own load client.

    python -m benchmarks.serve_compare [--workloads mixed,shared-prefix] [--num-prompts 60]
        [--request-rate 1] [--seed 1] [--runs 1] [--results-dir DIR] [--smoke]

Builds the benchmark model (benchmarks/bench_model.py, bfloat16), then, in each run, serves it
in turn with each side, each on a Ray cluster of its own that is shut down before the other
side starts:

- pdserve: one prefill replica pinned to core 0, one decode replica on core 1, its router;
  Ray's processes, the router, the proxy and the replicas' front ends run on the decode core
  (``serving_cores``), so the prefill core computes only prefills;
- colocated: two plain vLLM engines with the same settings, one per core, behind Ray Serve
  (benchmarks/colocated.py).

After a short warm-up, ``vllm.benchmarks.serve`` sends each workload (the same seeded
requests to both sides, Poisson arrivals at ``--request-rate``) and saves its results, from
which the tables are read back:

- mixed: random prompts of 102 to 1,945 tokens, 128 output tokens each;
- shared-prefix: 4 prefixes of 1,536 tokens, each followed by 128 random tokens, 128 output
  tokens each;
- smoke (``--smoke``): 8 prompts of 96 to 288 tokens, 16 output tokens each.

One table per workload: TTFT, TPOT, ITL and end-to-end latency at p50/p90/p99 (ms) and goodput
(requests per second meeting TTFT <= 2 s and TPOT <= 100 ms), for each side and their ratio
(pdserve / colocated: below 1 is better for a latency, above 1 for goodput). With ``--runs N``
every run is listed, then each side's mean and spread (max - min). The tables, vLLM's result
files and a PNG of the TTFT and ITL distributions (CDFs) go to the results directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.cpu_usage import Usage
    from cluster.config import EngineConfig, PDConfig

SIDES = ("pdserve", "colocated")
METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}
PERCENTILES = (50, 90, 99)
SLO_MS = {"ttft": 2000, "tpot": 100}  # what a request must meet to count in goodput
GOODPUT = "request_goodput"
# The table's columns, named as vLLM's result files name them.
COLUMNS = tuple(f"p{p}_{m}_ms" for m in METRICS for p in PERCENTILES) + (GOODPUT,)
MAX_MODEL_LEN = 2304
COLOCATED_CORES = ("0", "1")
PHASES_WAIT_S = 60.0  # how long to wait for the router's TTFT phases to be exported


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    dataset_flags: tuple[str, ...]  # vllm.benchmarks.serve's dataset flags


WORKLOADS = {w.name: w for w in (
    Workload("mixed", ("--dataset-name", "random", "--random-input-len", "1024",
                       "--random-range-ratio", "0.9", "--random-output-len", "128")),
    Workload("shared-prefix", ("--dataset-name", "prefix_repetition",
                               "--prefix-repetition-prefix-len", "1536",
                               "--prefix-repetition-suffix-len", "128",
                               "--prefix-repetition-num-prefixes", "4",
                               "--prefix-repetition-output-len", "128")),
)}
SMOKE = Workload("smoke", ("--dataset-name", "random", "--random-input-len", "192",
                           "--random-range-ratio", "0.5", "--random-output-len", "16"))
SMOKE_NUM_PROMPTS = 8
# Sent to each side before it is measured, unrecorded; prompts no workload shares.
WARM_UP = Workload("warm-up", ("--dataset-name", "random", "--random-input-len", "512",
                               "--random-range-ratio", "0.9", "--random-output-len", "8"))
WARM_UP_NUM_PROMPTS = 4


@dataclasses.dataclass(frozen=True)
class Traffic:
    num_prompts: int
    request_rate: float  # requests per second (Poisson); inf: all at once
    seed: int


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One side's run of one workload, read back from vLLM's saved result."""

    values: dict[str, float]  # by COLUMNS
    num_completed: int
    num_failed: int
    ttfts_ms: list[float]  # per successful request
    itls_ms: list[float]  # every gap between tokens of successful requests
    # pdserve's TTFT split: phase -> (mean ms, streams that went through it, median ms)
    phases_ms: dict[str, tuple[float, int, float | None]] = dataclasses.field(
        default_factory=dict)
    cpu: Usage | None = None  # where the CPU went while the workload ran


def load_result(path: Path) -> RunResult:
    """Read a result file of ``vllm.benchmarks.serve --save-result --save-detailed``."""
    data = json.loads(path.read_text())
    missing = [c for c in COLUMNS if data.get(c) is None]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: run with these percentile "
                         "metrics and --goodput")
    ok = [not error for error in data.get("errors", [])]
    ttfts = [t for t, good in zip(data.get("ttfts", []), ok, strict=True) if good]
    itls = [gaps for gaps, good in zip(data.get("itls", []), ok, strict=True) if good]
    return RunResult(
        values={c: float(data[c]) for c in COLUMNS},
        num_completed=int(data["completed"]),
        num_failed=int(data.get("failed", 0)),
        ttfts_ms=[1e3 * t for t in ttfts],
        itls_ms=[1e3 * t for gaps in itls for t in gaps],
    )


def ratio(pdserve: dict[str, float], colocated: dict[str, float]) -> dict[str, float]:
    """pdserve / colocated, column by column (nan where the baseline is 0)."""
    return {c: pdserve[c] / colocated[c] if colocated[c] else float("nan") for c in COLUMNS}


def mean_and_spread(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Each column's mean over ``runs`` and its spread (max - min)."""
    columns = {c: [r[c] for r in runs] for c in COLUMNS}
    return ({c: statistics.fmean(v) for c, v in columns.items()},
            {c: max(v) - min(v) for c, v in columns.items()})


def table_rows(results: dict[str, list[RunResult]]) -> list[tuple[str, dict[str, float]]]:
    """(label, values) rows: with one run per side, each side and the ratio; with several,
    every run, each side's mean and spread, and the ratio of the means."""
    if all(len(runs) == 1 for runs in results.values()):
        rows = [(side, results[side][0].values) for side in SIDES]
        return rows + [("ratio", ratio(rows[0][1], rows[1][1]))]
    rows, means = [], {}
    for side in SIDES:
        values = [r.values for r in results[side]]
        rows += [(f"{side} #{i}", v) for i, v in enumerate(values, 1)]
        means[side], spread = mean_and_spread(values)
        rows += [(f"{side} mean", means[side]), (f"{side} spread", spread)]
    return rows + [("ratio of means", ratio(means["pdserve"], means["colocated"]))]


def format_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> str:
    """A text table: latency columns in ms, goodput in req/s, ratios to two decimals."""
    width, label_width = 8, 16
    groups = "".join(f"{name:<{width * len(PERCENTILES)}}" for name in METRICS.values())
    lines = [title, " " * label_width + groups + "goodput",
             " " * label_width + "".join(f"{'p' + str(p):<{width}}" for p in PERCENTILES)
             * len(METRICS) + "req/s"]
    for label, values in rows:
        cells = []
        for column in COLUMNS:
            precision = 2 if label.startswith("ratio") or column == GOODPUT else 1
            cells.append(f"{values[column]:<{width}.{precision}f}")
        lines.append(f"{label:<{label_width}}" + "".join(cells).rstrip())
    return "\n".join(lines)


def table_title(workload: str, traffic: Traffic, results: dict[str, list[RunResult]]) -> str:
    slo = ", ".join(f"{METRICS[k]} <= {v} ms" for k, v in SLO_MS.items())
    failed = [f"{side} run {i}: {r.num_failed} failed" for side in SIDES
              for i, r in enumerate(results[side], 1) if r.num_failed]
    return (f"{workload}: {traffic.num_prompts} prompts at {traffic.request_rate:g} req/s, "
            f"seed {traffic.seed} (latencies in ms; goodput: requests/s with {slo}; ratio: "
            f"pdserve / colocated)" + ("\n  " + "; ".join(failed) if failed else ""))


def plot_cdfs(results: dict[str, dict[str, list[RunResult]]], path: Path) -> None:
    """One row per workload: the TTFT and the ITL CDFs of both sides (all runs pooled)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 3.6 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), 2, squeeze=False)
    for row, (workload, by_side) in zip(axes, results.items(), strict=True):
        for ax, (field, name) in zip(row, (("ttfts_ms", "TTFT"), ("itls_ms", "ITL")),
                                     strict=True):
            for side, runs in by_side.items():
                samples = [v for r in runs for v in getattr(r, field)]
                if samples:
                    ax.ecdf(samples, label=side)
            ax.set(xscale="log", xlabel=f"{name} (ms)", ylabel="fraction",
                   title=f"{workload}: {name}")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels at powers of ten only
            ax.grid(alpha=0.3)
            ax.legend()
    fig.savefig(path, dpi=110)


def engine_config(model: Path) -> EngineConfig:
    """The engine settings both sides run."""
    from cluster.config import EngineConfig

    return EngineConfig(model=str(model), dtype="bfloat16", max_model_len=MAX_MODEL_LEN)


def pdserve_config(engine: EngineConfig, overrides: dict[str, Any] | None = None) -> PDConfig:
    """pdserve's defaults (prefill on core 0, decode on core 1, everything else on the decode
    core) serving ``engine``, with ``overrides`` (PDConfig fields, merged key by key:
    ``--pdserve-config``) on top."""
    from cluster.config import PDConfig, PoolConfig

    defaults = PDConfig()
    base = PDConfig(prefill=PoolConfig(engine=engine, cpu_cores=defaults.prefill.cpu_cores),
                    decode=PoolConfig(engine=engine, cpu_cores=defaults.decode.cpu_cores),
                    serving_cores=defaults.decode.cpu_cores)
    return PDConfig.model_validate(_merged(base.model_dump(), overrides or {}))


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out


PDSERVE_OVERRIDES: dict[str, Any] = {}  # set from --pdserve-config


def start_pdserve(engine: EngineConfig) -> Any:
    """Start Ray with the pools' resources; return the pdserve app."""
    from cluster.local import connect_or_start
    from deploy.app import build_app_from_config

    cfg = pdserve_config(engine, PDSERVE_OVERRIDES)
    connect_or_start(cfg)
    return build_app_from_config(cfg)


def start_colocated(engine: EngineConfig) -> Any:
    """Start Ray; return the baseline app (one engine per core)."""
    import ray

    from benchmarks.colocated import build_app

    ray.init()
    return build_app(engine, list(COLOCATED_CORES))


STARTERS = {"pdserve": start_pdserve, "colocated": start_colocated}


@contextlib.contextmanager
def serving(side: str, engine: EngineConfig) -> Iterator[str]:
    """Serve ``side`` over HTTP on a free port until the block ends; yield its base URL. Ray
    Serve and Ray are shut down afterwards, so the next side gets both cores."""
    import ray
    from ray import serve

    from cluster.ports import free_port_block

    try:
        app = STARTERS[side](engine)
        port = free_port_block("127.0.0.1", 1)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=side, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def client_argv(workload: Workload, traffic: Traffic, url: str, model: Path,
                result: Path) -> list[str]:
    """``vllm.benchmarks.serve``'s arguments for one workload against ``url``."""
    return [
        *workload.dataset_flags,
        "--backend", "vllm", "--base-url", url, "--model", str(model),
        "--num-prompts", str(traffic.num_prompts), "--request-rate", str(traffic.request_rate),
        "--seed", str(traffic.seed), "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", ",".join(METRICS),
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--goodput", *(f"{k}:{v}" for k, v in SLO_MS.items()),
        "--save-result", "--save-detailed", "--result-dir", str(result.parent),
        "--result-filename", result.name, "--disable-tqdm",
    ]


def parse_client_args(argv: list[str]) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args(argv)


def run_client(argv: list[str]) -> None:
    from vllm.benchmarks.serve import main

    main(parse_client_args(argv))


# phase -> (sum in s, count, cumulative count by bucket upper bound in s)
PhaseTotals = dict[str, tuple[float, float, dict[float, float]]]


def phase_totals() -> PhaseTotals:
    """pdserve's router's TTFT phase histogram by phase, as exported now."""
    from cluster.scrape import scrape, total
    from router.metrics import TTFT_PHASES

    samples = scrape()
    name = "ray_pdserve_router_ttft_phase_seconds"
    totals = {}
    for phase in TTFT_PHASES:
        buckets: dict[float, float] = {}
        for n, labels, value in samples:
            if n == f"{name}_bucket" and labels.get("phase") == phase:
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
        totals[phase] = (total(samples, f"{name}_sum", phase=phase) or 0.0,
                         total(samples, f"{name}_count", phase=phase) or 0.0, buckets)
    return totals


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of a histogram's observations from its cumulative bucket counts,
    interpolated within the bucket it falls in (as Prometheus' ``histogram_quantile``); the
    largest finite bound when it falls in the ``+Inf`` bucket; None without observations or
    without a ``+Inf`` bucket."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != float("inf") or buckets[bounds[-1]] <= 0:
        return None  # no observations, or not a whole histogram (it ends with +Inf)
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, buckets[bound]
    return lower


def phase_means_ms(before: PhaseTotals, after: PhaseTotals
                   ) -> dict[str, tuple[float, int, float | None]]:
    """Each phase's mean and median (ms) over the observations between two ``phase_totals``,
    and how many streams went through it; the phases none went through are left out."""
    means = {}
    for phase, (sum_s, count, buckets) in after.items():
        old_sum, old_count, old_buckets = before[phase]
        num = count - old_count
        if num > 0:
            p50 = bucket_quantile(0.5, {le: n - old_buckets.get(le, 0.0)
                                        for le, n in buckets.items()})
            means[phase] = (1e3 * (sum_s - old_sum) / num, round(num),
                            None if p50 is None else 1e3 * p50)
    return means


def wait_for_phases(num_streams: int, timeout_s: float = PHASES_WAIT_S) -> PhaseTotals:
    """The phase totals once ``num_streams`` streams in all were split (every stream has a
    ``decode`` phase; Ray exports metrics every few seconds), or what came within
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        totals = phase_totals()
        if totals["decode"][1] >= num_streams or time.monotonic() > deadline:
            return totals
        time.sleep(2)


def measure_side(side: str, engine: EngineConfig, workloads: list[Workload],
                 traffic: Traffic, out_dir: Path, run: int) -> dict[str, RunResult]:
    """Start ``side``, warm it up, send every workload, tear it down; results by workload.
    For pdserve, each result also holds the mean of each TTFT phase (router/metrics.py)."""
    from benchmarks import cpu_usage

    model = Path(engine.model)
    results = {}
    with serving(side, engine) as url:
        warm_up = Traffic(WARM_UP_NUM_PROMPTS, float("inf"), traffic.seed + 1000)
        path = out_dir / f"{WARM_UP.name}-{side}-run{run}.json"
        run_client(client_argv(WARM_UP, warm_up, url, model, path))
        num_streams = load_result(path).num_completed  # so far, on this fresh deployment
        for workload in workloads:
            path = out_dir / f"{workload.name}-{side}-run{run}.json"
            before = wait_for_phases(num_streams) if side == "pdserve" else None
            cpu_before = cpu_usage.snapshot()
            run_client(client_argv(workload, traffic, url, model, path))
            result = dataclasses.replace(
                load_result(path), cpu=cpu_usage.usage(cpu_before, cpu_usage.snapshot()))
            num_streams += result.num_completed
            if before is not None:
                after = wait_for_phases(num_streams)
                result = dataclasses.replace(result, phases_ms=phase_means_ms(before, after))
            results[workload.name] = result
    return results


def format_phases(results: dict[str, list[RunResult]]) -> str:
    """pdserve's TTFT split, one row per run (mean and median ms of each phase)."""
    from router.metrics import TTFT_PHASES

    runs = [r.phases_ms for r in results["pdserve"] if r.phases_ms]
    if not runs:
        return ""
    phases = [p for p in TTFT_PHASES if any(p in r for r in runs)]
    lines = ["pdserve's time to first token by phase: mean / median ms over the streams that "
             "went through it (the median from the histogram's buckets), and how many did "
             "(router/metrics.py TTFT_PHASES)",
             "".ljust(12) + "".join(p.rjust(26) for p in phases)]
    for i, r in enumerate(runs, 1):
        cells = [f"{r[p][0]:.1f} / {_ms(r[p][2])} ({r[p][1]})" if p in r else "-"
                 for p in phases]
        lines.append(f"run {i}".ljust(12) + "".join(c.rjust(26) for c in cells))
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_cpu(workload: str, results: dict[str, list[RunResult]]) -> str:
    """Each side's CPU use while the workload ran, one block per run."""
    from benchmarks.cpu_usage import format_usage

    return "\n".join(format_usage(f"{workload}, {side} run {i}: CPU while measured", r.cpu)
                     for side in SIDES for i, r in enumerate(results[side], 1) if r.cpu)


def measure(workloads: list[Workload], traffic: Traffic, num_runs: int, out_dir: Path
            ) -> dict[str, dict[str, list[RunResult]]]:
    """Results by workload, then side, one per run; the sides take turns in each run."""
    from benchmarks.bench_model import ensure_bench_model

    engine = engine_config(ensure_bench_model())
    results = {w.name: {side: [] for side in SIDES} for w in workloads}
    for run in range(1, num_runs + 1):
        for side in SIDES:
            for name, result in measure_side(side, engine, workloads, traffic, out_dir,
                                             run).items():
                results[name][side].append(result)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--num-prompts", type=int, default=60, help="requests per workload")
    parser.add_argument("--request-rate", type=float, default=1.0,
                        help="requests per second (Poisson arrivals)")
    parser.add_argument("--seed", type=int, default=1, help="the workloads' seed")
    parser.add_argument("--runs", type=int, default=1, help="times each side is measured")
    parser.add_argument("--results-dir", type=Path, help="where results go (default: a new "
                        "directory under the system's temporary directory)")
    parser.add_argument("--pdserve-config", type=Path, help="a YAML of PDConfig fields to set "
                        "on pdserve's side (e.g. router: {pairing: {prefill_saturation_s: 2}})")
    parser.add_argument("--smoke", action="store_true", help=f"one short workload of "
                        f"{SMOKE_NUM_PROMPTS} prompts, to check the setup")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.num_prompts < 1:
        parser.error("--runs and --num-prompts must be at least 1")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    if args.pdserve_config:
        import yaml

        PDSERVE_OVERRIDES.update(yaml.safe_load(args.pdserve_config.read_text()) or {})
        pdserve_config(engine_config(Path("unused")), PDSERVE_OVERRIDES)  # fail early
    workloads = [SMOKE] if args.smoke else [WORKLOADS[n] for n in args.workloads.split(",")]
    traffic = Traffic(SMOKE_NUM_PROMPTS if args.smoke else args.num_prompts,
                      args.request_rate, args.seed)
    out_dir = args.results_dir or Path(tempfile.gettempdir()) / "pdserve-serve-compare" / \
        time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = measure(workloads, traffic, args.runs, out_dir)
    tables = "\n\n".join(
        "\n\n".join(filter(None, (format_table(table_title(name, traffic, by_side),
                                               table_rows(by_side)), format_phases(by_side),
                                format_cpu(name, by_side))))
        for name, by_side in results.items())
    (out_dir / "tables.txt").write_text(tables + "\n")
    plot = out_dir / "latency_cdfs.png"
    plot_cdfs(results, plot)
    print(f"\n{tables}\n\nresults: {out_dir}\nplot: {plot}", flush=True)


if __name__ == "__main__":
    main()
