"""Benchmarks: scripts that print numbers (never timed tests). `python -m scaling.benchmarks.train` times the
training step, `.forward` the forward pass, `.eval` the FID Inception and sampling."""
