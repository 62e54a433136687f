"""Synthetic data: chest-CT phantoms and the COV19-CT-DB-style dataset generator."""
