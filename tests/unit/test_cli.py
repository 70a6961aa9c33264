"""The ``pdserve`` command: its arguments, the config they build, and which path it takes."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import DEMO_MODEL_DIR, PDConfig
from cluster.local import cluster_address
from deploy import serve_local
from deploy.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_serve_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.grpc_port) == ("127.0.0.1", 8000, 9000)
    assert args.config is None and args.model is None and args.address is None
    assert args.run is serve_local.serve_from_args
    assert serve_local.load_config(args.config, args.model) == PDConfig()


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_model_goes_to_both_pools() -> None:
    args = build_parser().parse_args(["serve", "--model", "/ckpt/llama", "--port", "8100",
                                      "--grpc-port", "9100", "--host", "0.0.0.0"])
    cfg = serve_local.load_config(args.config, args.model)
    assert cfg.prefill.engine.model == cfg.decode.engine.model == "/ckpt/llama"
    assert cfg.model_name == "/ckpt/llama"
    assert (cfg.prefill.cpu_cores, cfg.decode.cpu_cores) == ("0", "1")  # the defaults stay
    assert (args.host, args.port, args.grpc_port) == ("0.0.0.0", 8100, 9100)


def test_config_file_and_model_override(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({
        "prefill": {"num_replicas": 2, "engine": {"max_model_len": 512}},
        "decode": {"num_replicas": 3, "engine": {"max_model_len": 512}},
        "app_name": "mine",
    }))
    args = build_parser().parse_args(["serve", "--config", str(path)])
    cfg = serve_local.load_config(args.config, args.model)
    assert (cfg.prefill.num_replicas, cfg.decode.num_replicas, cfg.app_name) == (2, 3, "mine")
    assert cfg.prefill.engine.model == str(DEMO_MODEL_DIR)

    args = build_parser().parse_args(["serve", "--config", str(path), "--model", "/m"])
    cfg = serve_local.load_config(args.config, args.model)
    assert cfg.decode.engine.model == "/m"
    assert (cfg.decode.num_replicas, cfg.decode.engine.max_model_len) == (3, 512)


def test_address_comes_from_the_flag_then_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(None) == "10.0.0.1:6379"
    assert cluster_address("auto") == "auto"


class _FakeServe:
    """Records what ``serve_from_args`` asks of Ray Serve, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def connect_or_start(self, cfg: PDConfig, address: str | None = None) -> None:
        self.calls.append(("connect", address))

    def start(self, **options: Any) -> None:
        self.calls.append(("start", options))

    def run(self, app: Any, **options: Any) -> None:
        self.calls.append(("run", (app, options)))

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> _FakeServe:
    from ray import serve

    import cluster.local
    import deploy.app

    fake = _FakeServe()
    monkeypatch.setattr(serve, "start", fake.start)
    monkeypatch.setattr(serve, "run", fake.run)
    monkeypatch.setattr(serve, "shutdown", fake.shutdown)
    monkeypatch.setattr(cluster.local, "connect_or_start", fake.connect_or_start)
    monkeypatch.setattr(deploy.app, "build_app_from_config", lambda cfg: ("app", cfg.app_name))
    monkeypatch.setattr(serve_local, "ensure_demo_model", lambda path: path)
    return fake


@pytest.mark.timeout(60)  # the local path would wait for Ctrl-C
def test_with_an_address_it_deploys_and_returns(
        fake_serve: _FakeServe, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    main(["serve", "--model", "/m", "--grpc-port", "9100"])  # returns: nothing waits
    (_, address), (_, start), (_, (app, run)) = fake_serve.calls
    assert address == "10.0.0.1:6379"
    assert start["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert start["grpc_options"]["port"] == 9100
    assert app == ("app", "pdserve")
    assert run == {"name": "pdserve", "route_prefix": "/"}
    assert "deployed '/m'" in capsys.readouterr().out


@pytest.mark.timeout(60)  # a lost Ctrl-C would leave it waiting for another
def test_a_ctrl_c_during_start_up_stops_serving_once_started(
        fake_serve: _FakeServe, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The app answers before ``serve.run`` returns, so a user may press Ctrl-C then: it is
    handled by pdserve (not lost), said at once, and serving stops as soon as start-up is
    over."""
    import cluster.local

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def connect_like_ray(cfg: PDConfig, address: str | None = None) -> None:
        signal.signal(signal.SIGTERM, lambda *_: pytest.fail("ray.init's SIGTERM handler"))
        fake_serve.connect_or_start(cfg, address)

    def run_and_interrupt(app: Any, **options: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler) and handler is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is handler  # pdserve's, not ray.init's
        handler(signal.SIGINT, None)  # as Python delivers a signal, in the main thread
        fake_serve.calls.append(("run", (app, options)))

    monkeypatch.setattr(cluster.local, "connect_or_start", connect_like_ray)
    monkeypatch.setattr("ray.serve.run", run_and_interrupt)
    try:
        main(["serve", "--model", "/m"])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert [name for name, _ in fake_serve.calls] == ["connect", "start", "run", "shutdown"]
    assert capfd.readouterr().err.count("pdserve: stopping") == 1


def test_the_console_script_is_this_cli() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["pdserve"] == "deploy.cli:main"
