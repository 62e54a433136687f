"""The COV19-CT-DB dataset: its layout and CSVs, finding and reading scans (JPEG, DICOM, NIfTI), stats.

Torch-free: ``cov3d stats`` imports only this package (and ``cov3d.viz`` for its histogram)."""
