"""Benchmarks: scripts that print numbers (never timed tests). `python -m scaling.benchmarks.train` times the
training step, `.forward` the forward pass, `.eval` the FID Inception and sampling, `.compare` the training step
against PyTorch, `.gpu` the GPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def model_names(text: str) -> list[str]:
    """A comma list of model names ("XL/2,DiT-B/4") as the short names configs use; "none" is the empty list."""
    from models.dit import short_name

    return [] if text == "none" else [short_name(name.strip()) for name in text.split(",")]


def run_measurement(module: str, *args: str, env: dict | None = None) -> dict | str:
    """`python -m MODULE ARGS` in a fresh process: the JSON on its last line of output, or why it failed (the
    out-of-memory line of its errors where there is one, else their last line, else the signal that killed it)."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        out_of_memory = [line for line in lines if "RESOURCE_EXHAUSTED" in line or "out of memory" in line]
        return (out_of_memory or lines or [f"killed by signal {-result.returncode} (out of memory?)"])[-1]
    return json.loads(result.stdout.strip().splitlines()[-1])
