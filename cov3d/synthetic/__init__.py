"""Synthetic data: chest-CT phantoms, the COV19-CT-DB-style dataset generator and the end-to-end demo."""
