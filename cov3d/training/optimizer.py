"""The optimiser: fastai's Adam as the paper's code ran it, computed by torch's fused AdamW kernel.

fastai's ``Adam`` (the original code's) runs about ten tensor operations per parameter per step,
882 small operations for r3d_18; torch's fused AdamW does the same arithmetic in one kernel per
parameter group (docs/benchmarks.md). The two agree step for step:

- moments: m = β1·m + (1 − β1)·g and v = β2·v + (1 − β2)·g² (fastai's dampened averages);
- step: p −= lr / (1 − β1^t) · m / (√(v / (1 − β2^t)) + ε), with β1 the momentum of this step;
- decoupled weight decay p ·= 1 − lr·wd before the step, except on normalisation and bias parameters
  (fastai's ``Learner(wd_bn_bias=False)``), which form a group without weight decay;
- fastai's defaults β2 = 0.99 and ε = 1e-5; 1cycle sets lr and β1 (``mom``) before every batch.

Runs recorded before this optimiser existed resume with fastai's own ``Adam`` (``OPTIMIZERS``), so
that they continue as they ran; their checkpoints hold its state.
"""

from __future__ import annotations

from functools import partial

import torch
from fastai.optimizer import Adam, OptimWrapper
from fastai.torch_core import norm_bias_params

from cov3d.errors import Cov3dError
from cov3d.settings import FASTAI_ADAM, FUSED_ADAMW, OPTIMIZERS

ADAM_SQR_MOM = 0.99
"""β2 of fastai's Adam (``sqr_mom``), which the original code used."""
ADAM_EPS = 1e-5
"""ε of fastai's Adam."""
ADAM_MOM = 0.9
"""β1 before the 1cycle schedule sets it (fastai's Adam default)."""


def fused_adamw(params, lr: float, *, model: torch.nn.Module, weight_decay: float) -> OptimWrapper:
    """torch's AdamW (fused where this torch and device have the kernel, else foreach) in fastai's
    wrapper, in two groups: `model`'s weights with ``weight_decay`` and its normalisation and bias
    parameters without. ``params``: what fastai's splitter gives (all trainable parameters)."""
    no_decay = {id(p) for p in norm_bias_params(model)}
    params = list(params)
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    kernel = {"fused": True} if fused_supported(params) else {"foreach": True}
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(ADAM_MOM, ADAM_SQR_MOM), eps=ADAM_EPS, **kernel)
    return OptimWrapper(opt=adamw)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW runs on these parameters' device (CPU from torch 2.4, CUDA)."""
    device = params[0].device.type if params else "cpu"
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def optimizer_function(name: str, model: torch.nn.Module, weight_decay: float):
    """fastai's ``opt_func`` for ``TrainSettings.optimizer`` ``name``. Weight decay lives in the
    optimiser's groups for the fused one (give the Learner and ``fit`` no ``wd``, which would set it
    on every group); fastai's Adam takes it from ``fit`` as before."""
    if name == FUSED_ADAMW:
        return partial(fused_adamw, model=model, weight_decay=weight_decay)
    if name == FASTAI_ADAM:
        return Adam
    raise Cov3dError(f"Unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}.")
