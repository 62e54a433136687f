"""Cov3d: detection of the presence and severity of COVID-19 from chest CT scans with 3D ResNets.

The public API is importable from here (``from cov3d import preprocess_scan, train, infer``);
each name is imported from its stage's package on first use, so that ``import cov3d`` stays cheap
and ``cov3d stats`` never imports torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Cov3dError": "cov3d.errors",
    # dataset
    "find_scans": "cov3d.dataset.scans",
    "read_severity_csv": "cov3d.dataset.layout",
    "dataset_stats": "cov3d.dataset.stats",
    "stats_report": "cov3d.dataset.stats",
    "write_stats": "cov3d.workflows.stats",
    # settings
    "VolumeShape": "cov3d.settings",
    "PRESETS": "cov3d.settings",
    "TrainSettings": "cov3d.settings",
    "DemoSettings": "cov3d.demo_settings",
    "Window": "cov3d.window",
    "MODEL_WINDOW": "cov3d.window",
    # preprocessing
    "preprocess_scan": "cov3d.preprocessing.preprocess",
    "VolumeCache": "cov3d.preprocessing.preprocess",
    "prune_cache": "cov3d.preprocessing.cache",
    "preprocess_many": "cov3d.preprocessing.workers",
    # model
    "build_model": "cov3d.model.network",
    "Cov3dLoss": "cov3d.model.loss",
    "export_model": "cov3d.model.files",
    "load_source": "cov3d.model.files",
    # training
    "train": "cov3d.training.train",
    "resume_training": "cov3d.training.train",
    # inference
    "infer": "cov3d.inference.infer",
    "explain": "cov3d.inference.explain",
    "show_scans": "cov3d.inference.views",
    # synthetic data
    "generate_dataset": "cov3d.synthetic.generator",
    "run_demo": "cov3d.workflows.demo",
}
"""Public name -> the module that defines it."""

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cov3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
