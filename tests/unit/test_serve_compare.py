"""benchmarks/serve_compare.py's pure parts: reading vLLM's saved results back, the ratio row,
the spread over runs, the table, the plot and the client's arguments (no Ray, no engine)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import serve_compare as sc


def fake_result(scale: float, goodput: float, failed: int = 0) -> dict:
    """What ``vllm.benchmarks.serve --save-result --save-detailed`` writes, with latencies
    ``scale`` times a base (p50 < p90 < p99) and one failed request per ``failed``."""
    data = {f"p{p}_{m}_ms": scale * p * (i + 1)
            for i, m in enumerate(sc.METRICS) for p in sc.PERCENTILES}
    data.update({"request_goodput": goodput, "completed": 3, "failed": failed,
                 "mean_ttft_ms": 1.0, "ttfts": [0.1, 0.2, 0.0, 0.3],
                 "itls": [[0.01, 0.02], [0.03], [], [0.04]],
                 "errors": ["", "", "boom", ""]})
    return data


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def load(tmp_path: Path, name: str, *args, **kwargs) -> sc.RunResult:
    return sc.load_result(write(tmp_path, name, fake_result(*args, **kwargs)))


def test_load_result_reads_every_column_and_the_successful_samples(tmp_path):
    result = load(tmp_path, "r.json", 2.0, 0.5, failed=1)
    assert set(result.values) == set(sc.COLUMNS)
    assert result.values["p90_ttft_ms"] == 180.0
    assert result.values["p99_e2el_ms"] == 2.0 * 99 * 4
    assert result.values["request_goodput"] == 0.5
    assert (result.num_completed, result.num_failed) == (3, 1)
    assert result.ttfts_ms == pytest.approx([100.0, 200.0, 300.0])  # the failed one left out
    assert result.itls_ms == pytest.approx([10.0, 20.0, 30.0, 40.0])


def test_load_result_refuses_a_file_without_the_percentiles_or_goodput(tmp_path):
    data = fake_result(1.0, 0.5)
    del data["p90_itl_ms"]
    data["request_goodput"] = None  # what vLLM saves when run without --goodput
    with pytest.raises(ValueError, match="p90_itl_ms, request_goodput"):
        sc.load_result(write(tmp_path, "r.json", data))


def test_ratio_is_pdserve_over_colocated_column_by_column(tmp_path):
    pdserve = load(tmp_path, "a.json", 1.0, 0.9).values
    colocated = load(tmp_path, "b.json", 4.0, 0.3).values
    colocated["p50_tpot_ms"] = 0.0
    r = sc.ratio(pdserve, colocated)
    assert r["p99_ttft_ms"] == pytest.approx(0.25)
    assert r["request_goodput"] == pytest.approx(3.0)
    assert math.isnan(r["p50_tpot_ms"])


def test_one_run_gives_each_side_and_the_ratio(tmp_path):
    results = {"pdserve": [load(tmp_path, "a.json", 1.0, 0.8)],
               "colocated": [load(tmp_path, "b.json", 2.0, 0.4)]}
    rows = sc.table_rows(results)
    assert [label for label, _ in rows] == ["pdserve", "colocated", "ratio"]
    assert rows[2][1]["p50_itl_ms"] == pytest.approx(0.5)
    assert rows[2][1]["request_goodput"] == pytest.approx(2.0)


def test_several_runs_give_every_run_the_mean_and_the_spread(tmp_path):
    results = {"pdserve": [load(tmp_path, f"p{i}.json", s, g)
                           for i, (s, g) in enumerate([(1.0, 0.6), (3.0, 0.8)])],
               "colocated": [load(tmp_path, f"c{i}.json", s, g)
                             for i, (s, g) in enumerate([(4.0, 0.2), (4.0, 0.4), (4.0, 0.3)])]}
    rows = dict(sc.table_rows(results))
    assert list(rows) == ["pdserve #1", "pdserve #2", "pdserve mean", "pdserve spread",
                          "colocated #1", "colocated #2", "colocated #3", "colocated mean",
                          "colocated spread", "ratio of means"]
    assert rows["pdserve mean"]["p50_ttft_ms"] == pytest.approx(100.0)
    assert rows["pdserve spread"]["p50_ttft_ms"] == pytest.approx(100.0)
    assert rows["colocated spread"]["p50_ttft_ms"] == pytest.approx(0.0)
    assert rows["colocated mean"]["request_goodput"] == pytest.approx(0.3)
    assert rows["colocated spread"]["request_goodput"] == pytest.approx(0.2)
    assert rows["ratio of means"]["p50_ttft_ms"] == pytest.approx(0.5)
    assert rows["ratio of means"]["request_goodput"] == pytest.approx(0.7 / 0.3)


def test_the_table_has_a_header_and_one_line_per_row(tmp_path):
    results = {"pdserve": [load(tmp_path, "a.json", 1.0, 0.8)],
               "colocated": [load(tmp_path, "b.json", 2.0, 0.4, failed=2)]}
    traffic = sc.Traffic(num_prompts=60, request_rate=1.0, seed=1)
    text = sc.format_table(sc.table_title("mixed", traffic, results), sc.table_rows(results))
    lines = text.splitlines()
    assert lines[0].startswith("mixed: 60 prompts at 1 req/s, seed 1")
    assert "colocated run 1: 2 failed" in lines[1]
    assert lines[2].split() == ["TTFT", "TPOT", "ITL", "E2E", "goodput"]
    assert lines[3].split() == ["p50", "p90", "p99"] * 4 + ["req/s"]
    pdserve, ratio_row = lines[4].split(), lines[6].split()
    assert pdserve[0] == "pdserve" and pdserve[1:4] == ["50.0", "90.0", "99.0"]
    assert pdserve[-1] == "0.80"
    assert ratio_row[0] == "ratio" and ratio_row[1] == "0.50" and ratio_row[-1] == "2.00"
    assert len(pdserve) == 1 + len(sc.COLUMNS)


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    run = load(tmp_path, "a.json", 1.0, 0.8)
    path = tmp_path / "cdfs.png"
    sc.plot_cdfs({"mixed": {"pdserve": [run], "colocated": [run]},
                  "shared-prefix": {"pdserve": [run], "colocated": [run]}}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vllms_client_accepts_the_arguments():
    pytest.importorskip("vllm")
    traffic = sc.Traffic(num_prompts=60, request_rate=1.0, seed=7)
    result = Path("/tmp/results/mixed-pdserve-run1.json")
    argv = sc.client_argv(sc.WORKLOADS["shared-prefix"], traffic, "http://127.0.0.1:1234",
                          Path("/models/bench"), result)
    args = sc.parse_client_args(argv)
    assert args.dataset_name == "prefix_repetition"
    assert args.prefix_repetition_prefix_len == 1536
    assert (args.num_prompts, args.request_rate, args.seed) == (60, 1.0, 7)
    assert args.goodput == ["ttft:2000", "tpot:100"]
    assert args.percentile_metrics == "ttft,tpot,itl,e2el"
    assert args.metric_percentiles == "50,90,99"
    assert args.save_result and args.save_detailed and args.ignore_eos
    assert (args.result_dir, args.result_filename) == ("/tmp/results", result.name)


@pytest.mark.parametrize("argv", [["--workloads", "mixed,nope"], ["--runs", "0"],
                                  ["--num-prompts", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        sc.parse_args(argv)


def test_the_default_is_both_workloads():
    assert sc.parse_args([]).workloads.split(",") == ["mixed", "shared-prefix"]


def test_phase_means_and_medians_come_from_the_histograms_difference() -> None:
    from benchmarks.serve_compare import phase_means_ms

    inf = float("inf")
    before = {"route": (0.5, 10.0, {0.001: 2.0, 0.002: 9.0, 0.005: 9.0, inf: 10.0}),
              "decode": (2.0, 10.0, {0.1: 0.0, 0.5: 10.0, inf: 10.0}),
              "prefill_call": (0.0, 0.0, {})}
    # Since then: route 0.001 to 0.002 s once, 0.002 to 0.005 s twice; decode 0.1 to 0.5 s 3x.
    after = {"route": (0.509, 13.0, {0.001: 2.0, 0.002: 10.0, 0.005: 12.0, inf: 13.0}),
             "decode": (2.6, 13.0, {0.1: 0.0, 0.5: 13.0, inf: 13.0}),
             "prefill_call": (0.0, 0.0, {})}
    means = phase_means_ms(before, after)
    assert means.keys() == {"route", "decode"}
    # Route: the median (rank 1.5 of 3) lies halfway into the 2 to 5 ms bucket's two.
    assert means["route"] == (pytest.approx(3.0), 3, pytest.approx(2.75))
    assert means["decode"] == (pytest.approx(200.0), 3, pytest.approx(300.0))


def test_bucket_quantiles_interpolate_as_prometheus_does() -> None:
    from benchmarks.serve_compare import bucket_quantile

    inf = float("inf")
    buckets = {0.001: 4.0, 0.002: 8.0, 0.005: 10.0, inf: 12.0}
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.00075)  # rank 3 of 4 in [0, 1 ms]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.0015)
    assert bucket_quantile(0.99, buckets) == 0.005  # in +Inf: the largest finite bound
    assert bucket_quantile(0.5, {0.001: 0.0, inf: 0.0}) is None
    assert bucket_quantile(0.5, {0.001: 4.0, 0.002: 8.0}) is None  # no +Inf: not a histogram


def test_a_bucket_first_exported_after_the_start_counts_from_zero() -> None:
    from benchmarks.serve_compare import phase_means_ms

    inf = float("inf")
    before = {"route": (0.0, 0.0, {})}  # nothing exported yet
    after = {"route": (0.004, 2.0, {0.001: 0.0, 0.002: 1.0, 0.005: 2.0, inf: 2.0})}
    assert phase_means_ms(before, after) == {"route": (pytest.approx(2.0), 2,
                                                       pytest.approx(2.0))}


def test_phases_table_lists_each_run_and_only_the_phases_seen() -> None:
    from benchmarks.serve_compare import RunResult, format_phases

    def run(phases: dict[str, float]) -> RunResult:
        return RunResult({}, 1, 0, [], [], phases)

    text = format_phases({"pdserve": [run({"route": (1.25, 60, 0.8),
                                           "decode": (50.0, 58, None)}),
                                      run({})], "colocated": [run({})]})
    header, row = text.splitlines()[1:]
    assert header.split() == ["route", "decode"]
    assert row.split() == ["run", "1", "1.2", "/", "0.8", "(60)", "50.0", "/", "-", "(58)"]
    assert format_phases({"pdserve": [run({})]}) == ""


def test_pdserve_overrides_merge_into_the_bench_config() -> None:
    from benchmarks.serve_compare import engine_config, pdserve_config

    cfg = pdserve_config(engine_config(Path("/models/bench")), {
        "router": {"pairing": {"prefill_saturation_s": 2.0}}, "decode": {"num_replicas": 1}})
    assert cfg.router.pairing == {"prefill_saturation_s": 2.0}  # PairingSettings' fields
    assert cfg.decode.num_replicas == 1 and cfg.prefill.num_replicas == 1
    assert cfg.prefill.engine.model == cfg.decode.engine.model == "/models/bench"
    assert cfg.prefill.cpu_cores == "0" and cfg.decode.cpu_cores == "1"
