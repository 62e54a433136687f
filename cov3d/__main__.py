"""`python -m cov3d` runs the command line."""

from cov3d.cli import app

app()
