"""The model: r3d_18 adaptation, Cov3dLoss (paper eqs. 1-6), validation metrics and safe model files."""
