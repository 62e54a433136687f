"""The `cov3d` command line: parses options, calls the library, turns user mistakes into one-line
errors. ``common`` holds the app and what the commands share; the commands live by stage in
``data``, ``training``, ``inference`` and ``reproduce`` (importing them registers them, in this order
in ``--help``).
Each command's function is named ``<command>_command``, apart from the library function it calls."""

# ruff: noqa: I001 (the imports register the commands: data, training, inference, then reproduce)
from cov3d.cli.common import app, phrase
from cov3d.cli.data import preprocess_command, prune_cache_command, show_command, stats_command, synthetic_command
from cov3d.cli.training import demo_command, train_command
from cov3d.cli.inference import explain_command, export_command, infer_command
from cov3d.cli.reproduce import reproduce_app

__all__ = ["app", "demo_command", "explain_command", "export_command", "infer_command", "phrase", "preprocess_command",
           "prune_cache_command", "reproduce_app", "show_command", "stats_command", "synthetic_command", "train_command"]
