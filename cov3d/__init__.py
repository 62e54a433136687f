"""Cov3d: detection of the presence and severity of COVID-19 from chest CT scans with 3D ResNets."""

__version__ = "0.1.0"
