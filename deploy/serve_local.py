"""Serve pdserve on this machine until Ctrl-C.

    python -m deploy.serve_local [--config my.yaml] [--model /path/to/hf/checkpoint]

Builds the demo model if it is missing, starts a local Ray cluster (or joins ``RAY_ADDRESS``),
deploys one prefill replica, one decode replica and the router, and answers OpenAI requests on
http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from deploy.config import PDConfig
from deploy.demo_model import DEFAULT_DIR, ensure_demo_model


def load_config(config: Path | None, model: str | None) -> PDConfig:
    data = PDConfig.from_yaml(config).model_dump() if config else {}
    if model:
        for role in ("prefill", "decode"):
            data.setdefault(role, {}).setdefault("engine", {})["model"] = model
    return PDConfig.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve pdserve locally until Ctrl-C.")
    parser.add_argument("--config", type=Path, help="a PDConfig YAML file")
    parser.add_argument("--model", help="a local Hugging Face checkpoint directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    cfg = load_config(args.config, args.model)
    if cfg.prefill.engine.model == str(DEFAULT_DIR):
        ensure_demo_model(DEFAULT_DIR)

    from ray import serve

    from cluster.local import connect_or_start
    from deploy.app import build_app_from_config

    connect_or_start(cfg)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app_from_config(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    print(f"pdserve is serving {cfg.model_name!r} on http://{args.host}:{args.port} "
          "(Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()


if __name__ == "__main__":
    main()
