"""Preprocessing: in-plane resize and depth interpolation to fixed-size volumes, the cache, parallel runs."""
