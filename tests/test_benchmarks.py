"""The benchmark scripts: the facts they compare against, and the GPU script's code path at toy sizes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.benchmarks.compare import other_load
from scaling.benchmarks.gpu import published_peak
from scaling.benchmarks.study_seeds import seed_row

REPO = Path(__file__).resolve().parent.parent


def test_published_peaks_by_device_kind():
    assert published_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert published_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert published_peak("NVIDIA H100 NVL") == pytest.approx(835.5e12)
    assert published_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert published_peak("NVIDIA A100-SXM4-40GB") == pytest.approx(312e12)
    assert published_peak("NVIDIA L4") == pytest.approx(121e12)
    assert published_peak("Tesla T4") is None


def test_other_load_sees_a_busy_core():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert other_load(0.5) > 0.8 / os.cpu_count()  # at least the one spinning core
    finally:
        busy.kill()


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_at_toy_sizes():
    result = subprocess.run([sys.executable, "-m", "scaling.benchmarks.gpu", "--smoke"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "fused attention (xla) vs matmul attention, bf16" in out and ": agree" in out
    assert "compile S/8 bf16 training step (batch 2): empty persistent cache" in out
    assert "S/8 bf16 batch 4:" in out and "img/s" in out
    no_gpu = subprocess.run([sys.executable, "-m", "scaling.benchmarks.gpu"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert no_gpu.returncode != 0 and "No GPU here" in no_gpu.stderr


def test_the_seeds_benchmark_reports_what_the_study_report_states():
    """Its row for the committed study: the numbers the study's report writes in words."""
    study = REPO / "runs" / "fmnist-default"
    report = (study / "report.md").read_text()
    row = seed_row(study, 0, None)
    right, total = (int(n) for n in row["pairs"].split("/"))
    assert f"Pearson r(log Gflops, log FD-FashionCNN-250) = {row['pearson_r']:.3f}" in report
    assert f"{right} of {total} adjacent pairs in the right order" in report
    assert f"{row['pairs_resolved']} of them resolved beyond the noise" in report
    assert f"{row['floor_ratio']:.1f} times the floor" in report
    frontier = next(line for line in report.splitlines() if "The training-compute frontier is owned" in line)
    assert row["frontier"].split(" > ") == [o.removeprefix("DiT-") for o in re.findall(r"(DiT-\w+-\d) \(", frontier)]
    assert "Larger models are more compute-efficient: holds" in report and "not ever larger" not in row["frontier"]
    for pair in row["class_accuracy"].split(", "):
        model, accuracy = pair.split()
        assert f"DiT-{model} {accuracy} (unguided" in report  # guided, the Fig. 7 setting
