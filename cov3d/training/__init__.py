"""Training: fastai Learner and DataBlock, 1cycle and logging callbacks, checkpoints, DDP, provenance."""
