"""Figures (matplotlib's object API, no pyplot): slice views, histograms, training curves, confusion matrices, Grad-CAM overlays."""
