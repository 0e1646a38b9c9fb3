"""``voice-engine``: serve the configured modules (``serve``), make tiny model sets (``tiny-model``), measure
(``bench``), measure the say channel (``selftest --say``: in this process, or through a running engine)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, load


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = load(Path(args.config))
    except ConfigError as exc:
        print(f"voice-engine: configuration error: {exc}", file=sys.stderr)
        return 2
    if cfg.cpu_threads > 0:
        import torch  # noqa: PLC0415

        torch.set_num_threads(cfg.cpu_threads)
    from .app import Engine  # noqa: PLC0415 - imports the configured modules' code only

    engine = Engine(cfg)
    try:
        engine.load()
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"voice-engine: cannot load a model: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(engine.serve())
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"voice-engine: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the modules of a configuration file")
    serve.add_argument("--config", required=True, help="the engine's JSON configuration")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)
    from .bench import add_cli as add_bench  # noqa: PLC0415
    from .selftest import add_cli as add_selftest  # noqa: PLC0415
    from .tiny import add_cli as add_tiny  # noqa: PLC0415

    add_tiny(sub)
    add_bench(sub)
    add_selftest(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "INFO")).upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
