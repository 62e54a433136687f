"""Figures (matplotlib, Agg): slice views, histograms, training curves, confusion matrices, Grad-CAM overlays."""
