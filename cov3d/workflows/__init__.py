"""Workflows: whole jobs that run the stages in turn: the demo, the paper's Table 3, training
measured as `cov3d train` runs it (for the benchmarks), and `cov3d stats`' tables with their figure."""
