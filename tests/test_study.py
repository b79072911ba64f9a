"""The study: the paper's findings checked on records, the held-out validation loss, and `dit-scaling study` end to
end (interrupted, resumed, re-rendered)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import REPO

from analysis import findings, paper, records, schema
from analysis.analyze import analyze
from models.dit import PAPER_MODELS, parse_model_name
from scaling import study
from scaling.cli import main

GFLOPS = {"S": 1.0, "B": 4.0, "L": 14.0, "XL": 20.0}  # per patch 8; each halving of the patch x4


def _protocol(sampling_steps, n=250, sampler="ddim", seed=0, guidance_scale=1.0):
    return schema.EvaluationProtocol(sampler=sampler, sampling_steps=sampling_steps, guidance_scale=guidance_scale,
                                     guidance_channels=0 if guidance_scale > 1 else None, num_samples=n, seed=seed,
                                     uint8_convention="dit", reference="fashion_mnist:train[:1000]",
                                     feature_network="FashionCNN")


VALIDATION = schema.EvaluationProtocol(sampler=None, sampling_steps=None, guidance_scale=None, guidance_channels=None,
                                       num_samples=100, seed=0, uint8_convention=None,
                                       reference="fashion_mnist:test[:100]",
                                       feature_network="none: noise-prediction MSE")


FLOOR = 40.0  # what real images score: the best config, DiT-XL/2, scores about 10.7 times as much


def write_study(directory, value_of, steps=(500, 1000, 1500, 2000), final_sampling=(4, 8, 32), noise_of=None):
    """A finished 12-config study whose metric at (gflops, step, sampling steps) is value_of(...). With
    `noise_of(gflops)`, the last step is evaluated again with noise seed 1 (the value times exp(noise_of(gflops)))
    and with guidance 4 (class accuracy 0.8 at DiT-XL/2, 0.6 at the other configs)."""
    for name in PAPER_MODELS:
        size, patch = parse_model_name(name)
        gflops = GFLOPS[size] * (8 // patch) ** 2 / 1000
        run = directory / schema.run_dir_name(name)
        run.mkdir(parents=True)
        schema.write_manifest(run, schema.Manifest(
            model_name=name, size=size, patch=patch, block="adaLN-Zero", resolution=32, gflops_per_image=gflops,
            macs_per_image=int(gflops * 1e9), params=1000, tokens=(32 // patch) ** 2, global_batch=16, seed=0,
            total_steps=steps[-1], config={}, model={}, data={}, status="finished", final_step=steps[-1]))
        for step in steps:
            evaluations = [(_protocol(16), value_of(gflops, step, 16), "FD-FashionCNN-250"),
                           (VALIDATION, value_of(gflops, step, None) / 1000, "val-loss-100")]
            if step == steps[-1]:
                evaluations += [(_protocol(s), value_of(gflops, step, s), "FD-FashionCNN-250") for s in final_sampling]
            if step == steps[-1] and noise_of is not None:
                evaluations += [(_protocol(16, seed=1), value_of(gflops, step, 16) * np.exp(noise_of(gflops)),
                                 "FD-FashionCNN-250"),
                                (_protocol(16, guidance_scale=4.0), value_of(gflops, step, 16) / 2,
                                 "FD-FashionCNN-250")]
            for protocol, value, metric in evaluations:
                details = {"class_accuracy": min(1.0, 30 / value), "floor": FLOOR} if metric.startswith("FD") else {}
                if protocol.guidance_scale == 4.0:
                    details["class_accuracy"] = 0.8 if name == "DiT-XL/2" else 0.6
                record = schema.EvaluationRecord.of(step=step, metric=metric, value=value, protocol=protocol,
                                                    gflops_per_image=gflops, global_batch=16, details=details)
                schema.append_jsonl(run / schema.EVALUATIONS_FILE, record.to_json())
    return directory


def paper_like(gflops, step, sampling_steps):
    """Better with model compute, training steps and (less) sampling steps; larger models win at equal compute."""
    sampling = 1.0 if sampling_steps is None else 1 + 0.2 / sampling_steps
    return 300 * gflops ** -0.3 * (step / 2000) ** -0.4 * sampling


def test_findings_hold_on_records_that_follow_the_paper(tmp_path):
    result = analyze(records.load(write_study(tmp_path, paper_like))).findings.get()
    assert result.metric == "FD-FashionCNN-250" and result.step == 2000
    assert result.numbers["pairs_right"] == 17 and result.numbers["pairs"] == 17
    # The closed form: log value = const - 0.3 log gflops exactly, so r = -1 and the slope is -0.3.
    assert result.numbers["pearson_r"] == pytest.approx(-1.0) and result.numbers["slope"] == pytest.approx(-0.3)
    assert result.numbers["frontier_owners"][-1] == "DiT-XL-2"  # and ever larger models before it:
    # The two largest configs' accuracies, as written: 30 / FD at 16 sampling steps.
    fd = {run: paper_like(g, 2000, 16) for run, g in (("DiT-XL-2", 0.32), ("DiT-L-2", 0.224))}
    assert result.numbers["class_accuracy"] == pytest.approx({run: min(1.0, 30 / v) for run, v in fd.items()})
    accuracy = next(f for f in result.findings if f.name.startswith("The largest"))
    assert accuracy.holds is False  # about 0.07: far from 0.7
    assert all(f.holds for f in result.findings if f is not accuracy), result.markdown()
    assert result.numbers["floor"] == FLOOR
    assert result.numbers["floor_ratio"] == pytest.approx(paper_like(0.32, 2000, 16) / FLOOR)
    assert result.numbers["proxy"] == "val-loss-100"
    # The proxy is the metric / 1000: ranks agree and a line through the origin predicts a left-out config exactly.
    assert result.numbers["proxy_rank_r"] == pytest.approx(1.0)
    assert result.numbers["proxy_typical_error"] == pytest.approx(0.0, abs=1e-6)


def test_findings_name_what_fails(tmp_path):
    def swapped(gflops, step, sampling_steps):  # DiT-S/8 and DiT-XL/2 (0.001 and 0.32 Gflops) trade places
        swap = {0.001: 0.32, 0.32: 0.001}
        return paper_like(swap.get(round(gflops, 6), gflops), step, sampling_steps)

    result = analyze(records.load(write_study(tmp_path, swapped))).findings.get()
    ordering = next(f for f in result.findings if f.name.startswith("Bigger size"))
    # Out of order: B/8 and S/4 against the best S/8; XL/2 against L/2 and XL/4.
    assert result.numbers["pairs_right"] == 13 and ordering.holds is False
    assert "DiT-S-8" in ordering.text and "DiT-XL-2" in ordering.text
    assert result.numbers["pearson_r"] > findings.MAX_PEARSON_R
    with_flat_sampling = analyze(records.load(write_study(
        tmp_path / "flat", lambda g, s, k: paper_like(g, s, None) * (1 + 400 / k if k else 1)))).findings.get()
    sampling = next(f for f in with_flat_sampling.findings if f.name.startswith("More sampling"))
    assert sampling.holds is False and "at no more sampling compute" in sampling.text


def test_noise_from_a_second_seed_resolves_pairs_and_guided_accuracy_is_reported(tmp_path):
    offsets = {g: 0.02 * (i % 5 - 2) for i, g in enumerate(sorted(
        GFLOPS[s] * (8 // p) ** 2 / 1000 for s, p in map(parse_model_name, PAPER_MODELS)))}
    analysis = analyze(records.load(write_study(tmp_path, paper_like, noise_of=lambda g: offsets[round(g, 9)])))
    # Two values per run: the pooled variance of log value is the mean over runs of (offset^2 / 2).
    expected_sd = np.sqrt(np.mean([o ** 2 / 2 for o in offsets.values()]))
    noise = analysis.noise.get()
    assert noise.sd_log == pytest.approx(expected_sd) and noise.runs == 12 and noise.dof == 12
    result = analysis.findings.get()
    # The seed-1 and guided evaluations are other protocols: the fits keep seed 0's unguided points alone.
    assert result.numbers["pearson_r"] == pytest.approx(-1.0)
    pairs = findings.ordered_pairs(analysis.model_compute.get().points)
    threshold = 1.96 * np.sqrt(2) * expected_sd
    brute_force = sum(abs(np.log(r.value_smaller) - np.log(r.value_bigger)) > threshold for r in pairs.itertuples())
    assert result.numbers["pairs_right_resolved"] == brute_force and result.numbers["pairs_wrong_resolved"] == 0
    assert result.numbers["guided_class_accuracy"] == {"DiT-XL-2": 0.8, "DiT-L-2": 0.6}
    accuracy = next(f for f in result.findings if f.name.startswith("The largest"))
    assert accuracy.holds is False and "DiT-L-2 0.60 (unguided" in accuracy.text
    assert "saturated" in next(f for f in result.findings if f.name.startswith("More sampling")).text


def test_fig10_compares_where_sampling_has_saturated_and_names_the_cases_below_it(tmp_path):
    def saturating(gflops, step, sampling_steps):  # no better beyond 16 steps; 3 and 7 times worse at 8 and 4
        far = 1.0 if sampling_steps is None or sampling_steps >= 16 else 1 + 2 * (16 / sampling_steps - 1)
        return paper_like(gflops, step, None) * far

    result = analyze(records.load(write_study(tmp_path, saturating, final_sampling=(4, 8, 32),
                                              noise_of=lambda g: 0.002 * (-1) ** int(g * 1e6)))).findings.get()
    sampling = next(f for f in result.findings if f.name.startswith("More sampling"))
    assert sampling.holds is True and "sampled with 16 or 32 steps, where sampling has saturated" in sampling.text
    # Brute force: a smaller model with more steps beating a larger one at no more sampling compute happens only
    # against the larger one at 4 or 8 steps.
    gflops = sorted(GFLOPS[s] * (8 // p) ** 2 / 1000 for s, p in map(parse_model_name, PAPER_MODELS))
    cases = [(g, k, h, j) for g in gflops for h in gflops for k in (4, 8, 16, 32) for j in (4, 8, 16, 32)
             if g < h and k > j and g * k <= h * j and saturating(g, 2000, k) < saturating(h, 2000, j)]
    assert cases and all(j < 16 for *_, j in cases)
    assert result.numbers["smaller_beats_larger_at_no_more_compute"] == len(cases)
    assert result.numbers["smaller_beats_larger_at_saturation"] == 0
    assert f"far from its saturation, {len(cases)} case(s)" in sampling.text

    def one_close_case(gflops, step, sampling_steps):  # DiT-B/8 (0.004) with 32 steps 1% better than L/8 (0.014)
        return saturating(gflops, step, sampling_steps) * (0.68 if round(gflops, 6) == 0.004 else 1.0)

    result = analyze(records.load(write_study(tmp_path / "close", one_close_case, final_sampling=(4, 8, 32),
                                              noise_of=lambda g: 0.02 * (-1) ** int(g * 1e6)))).findings.get()
    sampling = next(f for f in result.findings if f.name.startswith("More sampling"))
    assert result.numbers["smaller_beats_larger_at_saturation"] >= 1
    assert result.numbers["smaller_beats_larger_resolved"] == 0 and sampling.holds is True  # within the noise
    assert "DiT-B/8@32" in sampling.text and "0 of those case(s) beyond the noise" in sampling.text


def test_the_floor_finding_names_the_best_run_and_its_ratio():
    import pandas as pd

    final = pd.DataFrame({"run": ["DiT-S-8", "DiT-XL-2"], "value": [200.0, 100.0], "floor": [5.0, 5.0]})
    numbers = {}
    finding = findings._floor_finding(final, "FD-FashionCNN-250", numbers)
    assert numbers == {"floor": 5.0, "floor_ratio": 20.0} and finding.holds is False
    assert "DiT-XL-2, scores 100: 20.0 times the floor 5 " in finding.text
    assert findings._floor_finding(final.assign(floor=10.0), "FD-FashionCNN-250", {}).holds  # 10 times


def test_ordered_pairs_is_the_seventeen_adjacent_pairs():
    import pandas as pd

    rows = [{"run": f"{s}{p}", "size": s, "patch": p, "value": 10.0 * (4 - i) + p}
            for i, s in enumerate(paper.SIZES) for p in paper.PATCHES]
    pairs = findings.ordered_pairs(pd.DataFrame(rows))
    assert len(pairs) == 17 and (pairs["kind"] == "size").sum() == 9 and pairs["right"].all()
    rows[0]["value"] = 0.0  # S/8 best of all: wrong against B/8 and S/4
    pairs = findings.ordered_pairs(pd.DataFrame(rows))
    assert sorted(pairs.loc[~pairs["right"], "bigger"]) == ["B8", "S4"]


@pytest.mark.slow
def test_rendering_the_committed_study_computes_each_fit_once(tmp_path, monkeypatch):
    """One analysis pass: re-rendering the committed study (every figure, the fit report and the study's report)
    fits each metric once, the loss -> metric mapping included."""
    from analysis import isoflop, proxy
    from analysis import study as analysis_study
    from scaling import study as scaling_study

    workdir = tmp_path / "study"
    shutil.copytree(REPO / "runs" / "fmnist-default", workdir, ignore=shutil.ignore_patterns("figures", "report.md"))
    calls = []

    def count(module, name, metrics_of):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append((name, metrics_of(result)))
            return result

        monkeypatch.setattr(module, name, counted)

    for name in ("model_compute_fit", "training_compute_fit", "sampling_tradeoff"):
        count(analysis_study, name, lambda result: result.metadata["metric"])
    count(isoflop, "isoflop_analysis", lambda result: result.metric)
    count(proxy, "loss_proxy", lambda result: (result.loss_metric, result.metric))
    settings = json.loads((workdir / "study.json").read_text())
    found, written = scaling_study._render(workdir, settings["preset"], settings["seed"], settings["models"])

    sample, loss = "FD-FashionCNN-250", "val-loss-200"
    assert sorted(calls) == sorted([
        ("model_compute_fit", sample), ("model_compute_fit", loss), ("training_compute_fit", sample),
        ("training_compute_fit", loss), ("sampling_tradeoff", sample), ("isoflop_analysis", sample),
        ("isoflop_analysis", loss), ("loss_proxy", (loss, sample))])
    assert found.metric == sample and found.numbers["proxy"] == loss
    report = (workdir / "report.md").read_text()
    assert "## The paper's findings" in report and "## The held-out loss as a predictor" in report
    assert "(figures/fig9_validation_loss.png)" in report
    assert workdir / "figures" / "fig9_validation_loss.png" in written


# -- the held-out validation loss -----------------------------------------------------------------------------


def test_validation_loss_is_the_noise_prediction_error_on_held_out_images(fmnist_dir):
    """The evaluator's value against a direct computation: x_t from the closed form q(x_t | x_0), the model's noise
    prediction, the squared error averaged over images, timesteps and pixels; a batch size that does not divide
    the rows checks the padded last batch."""
    import jax
    from flax import nnx

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.dit import DiT
    from models.flops import dit_compute
    from scaling import data as data_lib
    from scaling.config import load_config, model_config
    from scaling.devices import make_mesh
    from scaling.evaluation.in_training import ValidationLossEvaluator, validation_timesteps

    config = load_config("fmnist:S/4,tiny", [f"data.path={fmnist_dir}", "eval.validation_examples=10",
                                                     "eval.validation_timesteps=3", "eval.batch_size=7"])
    dit = model_config(config, input_size=16, in_channels=1, num_classes=10)
    graphdef, state = nnx.split(DiT(dit, rngs=nnx.Rngs(3)))
    leaves, treedef = jax.tree.flatten(state)  # a trained-looking model: adaLN-Zero starts at a zero output
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape)
                                          for i, x in enumerate(leaves)])
    model = nnx.merge(graphdef, params)
    diffusion = GaussianDiffusion(linear_betas(1000), learn_sigma=True)
    source = data_lib.open_source(config)
    evaluator = ValidationLossEvaluator(config, source, dit, diffusion, dit_compute(dit), make_mesh())
    [record] = evaluator.run(100, params, evaluator.protocols)
    assert record.metric == "val-loss-10" and record.protocol.reference == "fashion_mnist@16x16:test[:10]"
    assert validation_timesteps(config) == [166, 500, 833]

    held_out = data_lib.FashionMNIST(str(fmnist_dir), split="test", resolution=16)
    x0 = held_out.images[:10].astype(np.float64) / 127.5 - 1
    noise = np.asarray(jax.random.normal(jax.random.key(config.eval.seed), (30, 16, 16, 1)), np.float64)
    alphas_bar = np.cumprod(1 - linear_betas(1000))
    errors = []
    for i, t in enumerate([166, 500, 833]):
        eps = noise[i * 10:(i + 1) * 10]
        x_t = np.sqrt(alphas_bar[t]) * x0 + np.sqrt(1 - alphas_bar[t]) * eps
        predicted = np.asarray(model(x_t.astype(np.float32), np.full(10, t), held_out.labels[:10]))[..., :1]
        errors.append(np.mean((predicted - eps) ** 2))
    assert record.value == pytest.approx(np.mean(errors), rel=1e-4)
    assert evaluator.run(200, params, evaluator.protocols)[0].value == pytest.approx(record.value)  # fixed inputs


# -- dit-scaling study ----------------------------------------------------------------------------------------


SMALL = ["--config.model.depth=1"]  # every config one block deep: the same study, compiled in half the time
PART = ["S/8", "S/4", "B/8"]  # two sizes, two patch sizes: every fit and figure from a quarter of the runs


def _study(workdir, fmnist_dir, **popen):
    return subprocess.Popen([sys.executable, "-m", "scaling.cli", "study", "--preset", "tiny", "--workdir",
                             str(workdir), "--models", ",".join(PART), f"--config.data.path={fmnist_dir}", *SMALL],
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_tiny_study_killed_resumes_and_renders(fmnist_dir, tmp_path, capsys, monkeypatch):
    """SIGKILL the study once its first runs have finished, while workers train: the workers end with it, the same
    command finishes the study without training the finished runs again, and a finished study only re-renders."""
    workdir = tmp_path / "study"
    first = _study(workdir, fmnist_dir)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("[study]") and "runs done" in line:
            break
    else:
        pytest.fail("the study ended before its first run finished:\n" + "".join(lines))
    workers = _children(first.pid)
    assert workers, "the study runs its configs in worker processes"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    for pid in workers:  # the workers die with the study (no second writer on a run it resumes)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                break
            __import__("time").sleep(0.1)
        else:
            pytest.fail(f"worker {pid} outlived the study")
    done_before = {run.name: (run / schema.STEPS_FILE).read_text() for run in workdir.iterdir()
                   if (run / schema.MANIFEST_FILE).is_file() and schema.read_manifest(run).status == "finished"}
    assert done_before

    second = _study(workdir, fmnist_dir)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    assert f"{len(done_before)}/3 runs finished already" in out
    for run, steps in done_before.items():  # finished runs were not trained again
        assert (workdir / run / schema.STEPS_FILE).read_text() == steps
    loaded = records.load(workdir)
    assert sorted(loaded.runs["model"]) == sorted(f"DiT-{m}" for m in PART)
    manifests = [schema.read_manifest(workdir / run) for run in loaded.runs["run"]]
    assert all(m.status == "finished" and m.final_step == 40 for m in manifests)
    evaluations = loaded.evaluations
    assert set(evaluations["metric"]) == {"FD-FashionCNN-60", "val-loss-32"}
    final = evaluations[(evaluations["step"] == 40) & (evaluations["metric"] == "FD-FashionCNN-60")]
    assert sorted(final["sampling_steps"].unique()) == [4, 8]  # Fig. 10's sampling-step counts at the end
    figures = sorted(p.stem for p in (workdir / "figures").glob("*.png"))
    assert {"fig7_samples", "class_grids", "fig8_gflops_fit", "fig9_training_compute",
            "fig10_sampling_compute"} <= set(figures)
    # The last step's samples, guided and unguided, kept in each run: the same labels, the first of each class.
    for run in loaded.runs["run"]:
        kept = sorted(p.name for p in (workdir / run / "samples").iterdir())
        assert kept == ["final-dpm-solver++4-guidance1.npz", "final-dpm-solver++4-guidance4.npz"]
        with np.load(workdir / run / "samples" / kept[1]) as batch:
            assert batch["arr_0"].shape == (60, 16, 16, 1) and list(batch["arr_1"][:10]) == list(range(10))
    report = (workdir / "report.md").read_text()
    assert "## The paper's findings" in report and "Pearson r(log Gflops" in report
    # The floor and the evaluation's noise (noise seed 1 at the last step) are stated.
    assert "The evaluation's noise: FD-FashionCNN-60 of the same checkpoints" in report and "times the floor" in report
    for name in ("fig7_samples", "fig8_gflops_fit", "fig10_sampling_compute"):
        assert f"(figures/{name}.png)" in report
    assert json.loads((workdir / "study.json").read_text())["preset"] == "tiny"

    # In this process from here: nothing is trained, so nothing needs a process of its own; the rendering just
    # checked is only counted.
    renderings = []
    monkeypatch.setattr(study, "_render", lambda *args: renderings.append(args) or (None, []))
    study_command = ["study", "--preset", "tiny", "--workdir", str(workdir)]
    assert main([*study_command, "--models", ",".join(PART), f"--config.data.path={fmnist_dir}", *SMALL]) == 0
    out = "".join(capsys.readouterr())
    assert "3/3 runs finished already" in out and "] step " not in out and len(renderings) == 1, out
    for different in (["--seed", "1", "--models", ",".join(PART)], []):  # another seed; all 12 configs
        assert main([*study_command, *different]) == 2
        assert "holds another study" in capsys.readouterr().err


def test_sharded_features_are_the_features_of_the_gathered_samples():
    """Features computed batch by batch where the samples were drawn (the last batch's padding left out) are the
    features of the samples `sample` gathers, row for row, and the first samples come back as drawn."""
    from flax import nnx

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.dit import DiT, dit_config
    from scaling.devices import make_mesh
    from scaling.evaluation.sampling import make_sampler, sharded_features

    dit = dit_config("S/8", input_size=16, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=1)
    _, params = nnx.split(DiT(dit, rngs=nnx.Rngs(0)))
    sampler = make_sampler(dit, GaussianDiffusion(linear_betas(1000), learn_sigma=True), sampling_steps=2,
                           sampler="ddim", guidance_scale=1.0, guidance_channels=0, batch_size=4, mesh=make_mesh())
    labels = np.arange(10) % 10
    samples = sampler(params, labels, 3)
    out = sharded_features(sampler, params, labels, 3,
                           lambda s: {"mean": s.mean(axis=(1, 2, 3)), "corner": s[:, 0, 0]}, first_samples=6)
    np.testing.assert_array_equal(out["mean"], samples.mean(axis=(1, 2, 3)))
    np.testing.assert_array_equal(out["corner"], samples[:, 0, 0])
    np.testing.assert_array_equal(out["samples"], samples[:6])
    assert len(np.unique(out["mean"])) == 10  # ten different samples, in their order
