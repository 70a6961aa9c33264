"""Serve pdserve on this machine until Ctrl-C, or deploy it to a running Ray cluster.

    python -m deploy.serve_local [--config my.yaml] [--model /path/to/hf/checkpoint]
    pdserve serve ...                                   # the same (deploy/cli.py)

Builds the demo model if it is missing, starts a local Ray cluster, deploys one prefill
replica, one decode replica and the router, and answers OpenAI requests on
http://127.0.0.1:8000 and gRPC requests (router/grpc_api/pdserve.proto) on port 9000. With
``--address`` or ``RAY_ADDRESS`` it deploys to that cluster instead and returns once the
application runs (Ray Serve keeps it running).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from cluster.config import DEMO_MODEL_DIR, PDConfig
from deploy.app import DEFAULT_GRPC_PORT
from deploy.demo_model import ensure_demo_model


def load_config(config: Path | None, model: str | None) -> PDConfig:
    """The config file's PDConfig (else the default), serving ``model`` if given."""
    data = (PDConfig.from_yaml(config) if config else PDConfig()).model_dump()
    if model:
        for role in ("prefill", "decode"):
            data.setdefault(role, {}).setdefault("engine", {})["model"] = model
    return PDConfig.model_validate(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``pdserve serve`` (and of this module)."""
    parser.add_argument("--config", type=Path, help="a PDConfig YAML file")
    parser.add_argument("--model", help="a local Hugging Face checkpoint directory to serve "
                        "(replaces the config's model on both pools)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help="gRPC port (pdserve.v1.PDServe, router/grpc_api/pdserve.proto)")
    parser.add_argument("--address", help="a running Ray cluster to deploy to, then return "
                        "(default: RAY_ADDRESS; neither: serve on this machine until Ctrl-C)")


def serve_from_args(args: argparse.Namespace) -> None:
    """Deploy the app ``args`` describe. On a running cluster (``--address`` or
    ``RAY_ADDRESS``) return once it runs; otherwise start Ray here and serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(args.config, args.model)
    if cfg.prefill.engine.model == str(DEMO_MODEL_DIR):
        ensure_demo_model(DEMO_MODEL_DIR)

    from ray import serve

    from cluster.local import cluster_address, connect_or_start
    from deploy.app import build_app_from_config, grpc_options

    address = cluster_address(args.address)
    connect_or_start(cfg, address)
    # After ray.init, which sets a SIGTERM handler of its own (exit, no serve.shutdown).
    stop = None if address else stop_on_signals()
    serve.start(http_options={"host": args.host, "port": args.port},
                grpc_options=grpc_options(args.grpc_port))
    serve.run(build_app_from_config(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    where = f"http://{args.host}:{args.port} and gRPC port {args.grpc_port}"
    if stop is None:
        print(f"pdserve deployed {cfg.model_name!r} as application {cfg.app_name!r} to the "
              f"Ray cluster at {address}; its proxies serve {where}", flush=True)
        return
    if not stop.is_set():
        print(f"pdserve is serving {cfg.model_name!r} on {where} (Ctrl-C to stop)", flush=True)
        stop.wait()
    serve.shutdown()


STOPPING_MESSAGE = "pdserve: stopping (after start-up, if it has not ended; Ctrl-C again " \
    "to abort)\n"


def stop_on_signals() -> threading.Event:
    """An event the first SIGINT or SIGTERM from now on sets. Installed before the app starts:
    it answers on its port before ``serve.run`` returns, and a Ctrl-C then must not be lost;
    start-up finishes and everything stops. A second Ctrl-C aborts at once."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop.is_set():
            try:  # os.write: a print here could re-enter one in progress
                os.write(2, STOPPING_MESSAGE.encode())
            except OSError:
                pass
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve pdserve locally until Ctrl-C, or "
                                     "deploy it to a running Ray cluster.")
    add_arguments(parser)
    serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
