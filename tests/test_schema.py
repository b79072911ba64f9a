"""The run-directory schema: typed records, their files, and the field tables of docs/records.md."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from records_factory import a_manifest

from analysis import records, schema
from analysis.schema import EvaluationProtocol, EvaluationRecord, Manifest, RecordsError, StepRecord

RECORDS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "records.md"


def _protocol(**changes) -> EvaluationProtocol:
    fields = dict(sampler="ddim", sampling_steps=25, guidance_scale=1.5, guidance_channels=None, num_samples=400,
                  seed=0, uint8_convention="dit", reference="fashion_mnist:train[:10000]",
                  feature_network="FashionCNN(epochs=2)")
    return EvaluationProtocol(**{**fields, **changes})


def test_the_writers_formulas_are_the_papers():
    record = StepRecord.of(step=100, global_batch=32, gflops_per_image=0.5, loss=0.2, mse=0.19, vb=0.01,
                           grad_norm=1.0, wall_time=10.0, time=0.0, step_time=0.25, flops_per_step=2e9,
                           peak_flops=1e11)
    assert record.images_seen == 3200 and record.train_gflops_cumulative == 3 * 0.5 * 32 * 100
    assert record.images_per_s == 32 / 0.25 and record.utilization == pytest.approx(2e9 / 0.25 / 1e11)
    first = StepRecord.of(step=1, global_batch=32, gflops_per_image=0.5, loss=0.2, mse=0.19, vb=None, grad_norm=1.0,
                          wall_time=10.0, time=0.0, step_time=None, flops_per_step=2e9, peak_flops=1e11)
    assert first.images_per_s is None and first.utilization is None
    guided = EvaluationRecord.of(step=400, metric="FD-FashionCNN-400", value=80.0, protocol=_protocol(),
                                 gflops_per_image=0.5, global_batch=32)
    assert guided.sampling_gflops_per_image == 0.5 * 25 * 2 and guided.train_gflops_cumulative == 3 * 0.5 * 32 * 400
    plain = EvaluationRecord.of(step=400, metric="FD-FashionCNN-400", value=80.0,
                                protocol=_protocol(guidance_scale=1.0), gflops_per_image=0.5, global_batch=32)
    assert plain.sampling_gflops_per_image == 0.5 * 25
    assert schema.metric_name("FID", 50_000) == "FID-50K" and schema.metric_family("FID-50K") == "FID"
    assert schema.run_dir_name("DiT-XL/2") == "DiT-XL-2"


def test_records_round_trip_through_json():
    step = StepRecord.of(step=5, global_batch=8, gflops_per_image=0.1, loss=0.3, mse=0.29, vb=0.01, grad_norm=2.0,
                         wall_time=1.0, time=2.0, step_time=0.1, flops_per_step=1e6, peak_flops=1e9)
    assert StepRecord.from_json(json.loads(json.dumps(step.to_json()))) == step
    evaluation = EvaluationRecord.of(step=5, metric="FD-FashionCNN-400", value=80.0, protocol=_protocol(),
                                     gflops_per_image=0.1, global_batch=8, details={"precision": 0.5}, seconds=3.0)
    written = json.loads(json.dumps(evaluation.to_json()))
    assert written["precision"] == 0.5 and "details" not in written  # details are top-level fields
    assert EvaluationRecord.from_json(written) == evaluation
    manifest = a_manifest(code_revision="abc123")
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    with pytest.raises(ValueError, match="clash"):
        EvaluationRecord.of(step=5, metric="m", value=1.0, protocol=_protocol(), gflops_per_image=0.1,
                            global_batch=8, details={"step": 3}).to_json()


def test_malformed_records_name_the_field_and_the_fix(tmp_path):
    data = a_manifest().to_json()
    with pytest.raises(RecordsError, match=r"lacks the field 'gflops_per_image' \(forward GMACs per image"):
        Manifest.from_json({k: v for k, v in data.items() if k != "gflops_per_image"}, "m.json")
    with pytest.raises(RecordsError, match=r"field 'global_batch' is '32', which is not int"):
        Manifest.from_json({**data, "global_batch": "32"}, "m.json")
    with pytest.raises(RecordsError, match="status 'paused' is not one of"):
        Manifest.from_json({**data, "status": "paused"}, "m.json")
    with pytest.raises(RecordsError, match="schema version 2, newer than"):
        Manifest.from_json({**data, "schema_version": 2}, "m.json")
    with pytest.raises(RecordsError, match="field 'vb' is 'x', which is not float | None"):
        StepRecord.from_json({**StepRecord.of(step=1, global_batch=1, gflops_per_image=1.0, loss=1.0, mse=1.0,
                                              vb=None, grad_norm=1.0, wall_time=1.0, time=1.0, step_time=None,
                                              flops_per_step=1.0, peak_flops=1.0).to_json(), "vb": "x"})
    with pytest.raises(RecordsError, match="lacks the field 'protocol'"):
        EvaluationRecord.from_json({"step": 1, "metric": "FID-50K", "value": 3.0})
    (tmp_path / schema.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(RecordsError, match="manifest.json is not valid JSON"):
        schema.read_manifest(tmp_path)


def test_one_jsonl_reader_skips_a_torn_last_line_and_names_any_other(tmp_path, caplog):
    path = tmp_path / "records.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a writer killed mid-line
    assert schema.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "cut short" in caplog.text
    schema.append_jsonl(path, {"step": 3})  # the torn line is cut off, not glued to the new one
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    path.write_text('{"step": 1}\n{"step": 2}')  # complete, only its newline is missing: kept
    schema.append_jsonl(path, {"step": 3})
    assert schema.read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(RecordsError, match=r"records.jsonl:2 is not valid JSON"):
        schema.read_jsonl(path)
    assert schema.read_jsonl(tmp_path / "absent.jsonl") == []


def test_a_run_written_through_the_schema_loads_with_every_field(tmp_path):
    workdir = tmp_path / "DiT-B-4"
    manifest = a_manifest(model_name="DiT-B/4", size="B", patch=4, resolution=256, gflops_per_image=5.5,
                          params=130_000_000, global_batch=256)
    schema.write_manifest(workdir, manifest)
    steps = [StepRecord.of(step=s, global_batch=256, gflops_per_image=5.5, loss=1 / s, mse=1 / s, vb=None,
                           grad_norm=1.0, wall_time=float(s), time=float(s), step_time=None if s == 1 else 0.5,
                           flops_per_step=1e12, peak_flops=1e13) for s in (1, 100, 200)]
    for step in steps:
        schema.append_jsonl(workdir / schema.STEPS_FILE, step.to_json())
    evaluation = EvaluationRecord.of(step=200, metric="FID-10K", value=40.0, protocol=_protocol(decoder="ft-MSE"),
                                     gflops_per_image=5.5, global_batch=256, details={"sfid": 9.0})
    schema.append_jsonl(workdir / schema.EVALUATIONS_FILE, evaluation.to_json())

    loaded = records.load(tmp_path)
    run = loaded.runs.iloc[0]
    assert (run["run"], run["model"], run["size"], run["patch"], run["block"]) == ("DiT-B-4", "DiT-B/4", "B", 4,
                                                                                  "adaLN-Zero")
    assert (run["resolution"], run["gflops"], run["params_m"], run["batch_size"], run["status"]) == (
        256, 5.5, 130.0, 256, "finished")
    for field in StepRecord.field_docs():
        assert all(_same(a, getattr(s, field)) for a, s in zip(loaded.steps[field], steps, strict=True)), field
    (row,) = loaded.evaluations.to_dict("records")
    for field, value in evaluation.to_json().items():
        if field != "protocol":
            assert _same(row[field], value), field
    for field, value in evaluation.protocol.to_json().items():
        if field in records.PROTOCOL_COLUMNS:
            assert _same(row[field], value), field
    assert row["fid"] == 40.0 and "guidance_scale=1.5" in row["protocol"]


def _same(loaded, written) -> bool:
    """A loaded table cell equals the written value (a null is NaN in a numeric column)."""
    return loaded == written or (written is None and pd.isna(loaded))


def _records_page_table(heading: str) -> str:
    text = RECORDS_PAGE.read_text()
    match = re.search(rf"^#+ {re.escape(heading)}\n\n(\|.*?\n)\n", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"{RECORDS_PAGE.name} has no table under {heading!r}"
    return match.group(1)


@pytest.mark.parametrize("record_class, heading", [
    (StepRecord, "Step records (records.jsonl)"), (EvaluationRecord, "Evaluation records (evaluations.jsonl)"),
    (EvaluationProtocol, "Protocols"), (Manifest, "Manifest (manifest.json)")])
def test_the_records_page_field_tables_are_the_schemas(record_class, heading):
    assert _records_page_table(heading) == schema.markdown_fields(record_class)
