"""The ``pdserve`` command, for installed users (no Makefile needed).

    pdserve serve                                  # the demo model, on this machine
    pdserve serve --model /path/to/checkpoint      # any local Hugging Face checkpoint
    pdserve serve --config my.yaml                 # any PDConfig YAML (cluster/config.py)
    pdserve serve --config my.yaml --address HEAD:6379   # deploy to a cluster, then return
    python -m deploy.cli serve ...                 # the same, where only the source is present

Without ``--address`` or ``RAY_ADDRESS``, ``serve`` starts a one-machine Ray cluster and serves
until Ctrl-C. With either, it deploys the application to that cluster and returns once it runs;
``ray job submit -- python -m deploy.cli serve ...`` takes this path, since a job's entrypoint
gets ``RAY_ADDRESS``.
"""

from __future__ import annotations

import argparse

from deploy import serve_local


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray Serve.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve locally, or deploy to the Ray cluster in --address / RAY_ADDRESS",
        description=serve_local.__doc__.splitlines()[0])
    serve_local.add_arguments(serve)
    serve.set_defaults(run=serve_local.serve_from_args)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
