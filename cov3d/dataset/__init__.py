"""The COV19-CT-DB dataset: its layout and CSVs, finding and reading scans (JPEG, DICOM, NIfTI), stats.

Torch-free, so that ``cov3d stats`` runs without importing torch."""
