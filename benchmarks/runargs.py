"""The command-line arguments of the benchmarks that load a run with its decoding settings, as ``recreason serve``."""

from __future__ import annotations

import argparse


def add_run_arguments(parser: argparse.ArgumentParser, prompts_help: str = "prompts in a batch") -> None:
    """``--run``, ``--config`` and ``--set`` (layered as for ``recreason serve``), and ``--prompts`` (default 16)."""
    parser.add_argument("--run", required=True)
    parser.add_argument("--config", action="append", default=[], help="config files, layered as for serve")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--prompts", type=int, default=16, help=prompts_help)
