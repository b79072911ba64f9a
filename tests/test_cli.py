"""The `dit-scaling` command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.dit import PAPER_MODELS, dit_config
from models.flops import dit_compute
from scaling.cli import main

REPO = Path(__file__).resolve().parent.parent


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_json_lists_the_twelve_paper_configs(capsys):
    code, out, _ = _run(capsys, "flops", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [row["model"] for row in rows] == list(PAPER_MODELS)
    for row in rows:
        compute = dit_compute(dit_config(row["model"]))
        assert row["params"] == compute.params and isinstance(row["params"], int)
        assert row["gflops"] == pytest.approx(compute.gflops)
        assert row["tokens"] == compute.tokens
        assert row["gflops"] == pytest.approx(row["paper_gflops"], rel=0.005, abs=0.005)


def test_flops_single_model_resolution_and_block(capsys):
    code, out, _ = _run(capsys, "flops", "XL/2", "--resolution", "512", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["tokens"] == 1024 and row["gflops"] == pytest.approx(524.6, rel=0.005)
    code, out, _ = _run(capsys, "flops", "DiT-S/8", "--block", "in-context")
    assert code == 0
    assert "DiT-S/8" in out and "in-context" in out and "multiply-accumulates" in out


def test_flops_bad_input_gives_an_error_naming_the_problem(capsys):
    code, _, err = _run(capsys, "flops", "S/8", "--resolution", "100")
    assert code == 2 and "multiple of" in err
    code, _, err = _run(capsys, "flops", "S/3")
    assert code == 2 and "not divisible by patch_size 3" in err
    code, _, err = _run(capsys, "flops", "--torch", "no_colon_here")
    assert code == 2 and "package.module:FUNCTION" in err


def test_flops_counts_a_pytorch_model_from_a_factory(tmp_path):
    pytest.importorskip("fvcore")
    factory = tmp_path / "my_model.py"
    factory.write_text(
        "import torch\n"
        "from models.torch_dit import ReferenceDiT\n"
        "def build():\n"
        "    model = ReferenceDiT(input_size=32, patch_size=8, hidden_size=384, depth=12, num_heads=6)\n"
        "    labels = torch.zeros(2, dtype=torch.long)\n"
        "    return model, (torch.zeros(2, 4, 32, 32), labels, labels)\n"
    )
    result = subprocess.run([sys.executable, "-m", "scaling.cli", "flops", "--torch", f"{factory}:build", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["macs"] == dit_compute(dit_config("S/8")).macs  # the PyTorch S/8 counts like ours
    assert row["batch"] == 2 and "aten::layer_norm" in row["uncounted_ops"]
