"""Inference: reflection TTA, ensembles, MC dropout, streaming preprocessing, Grad-CAM, `cov3d show`."""
