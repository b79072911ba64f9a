"""Scaling analysis on run records: pure pandas/numpy/scipy/matplotlib/seaborn, no JAX import."""
