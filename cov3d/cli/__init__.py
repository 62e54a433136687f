"""The `cov3d` command line: parses options, calls the library, turns user mistakes into one-line
errors. ``common`` holds the app and what the commands share; the commands live by stage in
``data``, ``training`` and ``inference`` (importing them registers them, in this order in ``--help``)."""

# ruff: noqa: I001 (the imports register the commands: data, then training, then inference)
from cov3d.cli.common import app, phrase
from cov3d.cli.data import preprocess, prune_cache, show, stats, synthetic
from cov3d.cli.training import demo, train
from cov3d.cli.inference import explain, export, infer

__all__ = ["app", "demo", "explain", "export", "infer", "phrase", "preprocess", "prune_cache", "show", "stats",
           "synthetic", "train"]
