"""Workflows: whole jobs that run the stages in turn (the demo, the paper's Table 3)."""
