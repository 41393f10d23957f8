"""benchmarks/bench_model.py and benchmarks/model_card.py: the shipping rule on known numbers, and a real
tiny model trained, benchmarked on coarse cases and described by its card."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import bench_model, model_card
from rwcflow import train as training
from rwcflow.checkpoint import read_metadata
from rwcflow.train import TrainConfig, load_config, train


def _summary(**rows) -> list[dict]:
    """Summary rows from ``method=(epe_mm, dice, wall_s)``."""
    return [{"method": method.replace("_", "+"), "epe_mm": epe, "dice": dice, "wall_s": wall}
            for method, (epe, dice, wall) in rows.items()]


def test_shipping_rule():
    good = _summary(io=(0.6, 0.85, 7.0), rwcnet=(0.55, 0.86, 1.0), rwcnet_io=(0.5, 0.87, 3.0))
    assert bench_model.verdict(good) == {"network_beats_io": True, "combined_beats_both": True, "ships": True}
    slow = _summary(io=(0.6, 0.85, 7.0), rwcnet=(0.55, 0.86, 7.5), rwcnet_io=(0.5, 0.87, 9.0))
    assert bench_model.verdict(slow) == {"network_beats_io": False, "combined_beats_both": True, "ships": False}
    lower_dice = _summary(io=(0.6, 0.85, 7.0), rwcnet=(0.55, 0.84, 1.0), rwcnet_io=(0.5, 0.87, 3.0))
    assert not bench_model.verdict(lower_dice)["network_beats_io"]
    combined_worse = _summary(io=(0.6, 0.85, 7.0), rwcnet=(0.55, 0.86, 1.0), rwcnet_io=(0.58, 0.87, 3.0))
    assert bench_model.verdict(combined_worse) == {"network_beats_io": True, "combined_beats_both": False,
                                                   "ships": False}
    lines = bench_model.verdict_lines(bench_model.verdict(slow))
    assert "**no**" in lines[0] and lines[1].endswith("yes") and "does not meet" in lines[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A three-stage tiny model trained for a few steps on synthetic MNI152 pairs at 10 mm."""
    run = tmp_path_factory.mktemp("run")
    config = TrainConfig.from_dict({**training.preset("tiny").to_dict(), "steps": [3, 2, 2], "validate_every": 2,
                                    "data": {"kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 10.0,
                                             "validation_pairs": 1}})
    return run, train(config, run, progress=False)


def test_bench_and_card_of_a_trained_model(tiny_run, tmp_path, capsys, monkeypatch):
    run, model = tiny_run
    out = tmp_path / "bench.json"
    assert bench_model.main(["--model", str(model), "--resolution", "8", "--threads", "1", "--out", str(out)]) == 0
    bench = json.loads(out.read_text())
    cases = sorted({r["case"] for r in bench["records"]})
    assert {"example", "mni-4mm-s1", "mni-8mm-s2", "mni-12mm-s3"} <= set(cases)
    assert len(bench["records"]) == len(cases) * len(bench_model.METHODS)
    assert bench["device"].startswith("CPU") and bench["resolution_mm"] == 8.0
    assert bench["model"]["sha256"] == model_card.file_digest(model)
    assert bench["verdict"] == bench_model.verdict(bench["summary"])
    rows = {r["method"]: r for r in bench["summary"]}
    assert rows["rwcnet"]["network_s"] > 10 * rows["io"]["network_s"] and rows["io"]["io_s"] > 0
    assert "Shipping rule" in out.with_suffix(".md").read_text()

    card_path = tmp_path / "card.md"
    assert model_card.main(["--model", str(model), "--run", str(run), "--bench", str(out),
                            "--out", str(card_path)]) == 0
    card = card_path.read_text()
    assert model_card.file_digest(model) in card
    for r in bench["summary"]:  # every method's means, as benchmarked
        assert f"| {r['method']} | {r['epe_mm']:.2f} | {r['epe95_mm']:.2f} | {r['dice']:.3f} |" in card
    assert all(line in card for line in bench_model.verdict_lines(bench["verdict"]))
    example = {r["method"]: r for r in bench["records"] if r["case"] == "example"}
    assert f"| example | {example['affine']['epe_mm']:.2f} / {example['affine']['dice']:.3f} /" in card
    logs = model_card.stage_logs([run], 3)
    assert [(log["run"], log["stage"], log["steps"]) for log in logs] == [(1, 0, 3), (1, 1, 2), (1, 2, 2)]
    assert float(logs[0]["last_validation"]["epe_mm"]) > 0
    for log in logs:
        assert f"| 1 | {log['stage']} | {log['steps']} | {log['seconds'] / 60:.1f} |" in card
    assert '"resolution_mm": 10.0' in card and "| 2 | 1 | 2 | 1 | 2 |" in card  # data; the third stage
    assert "rwcflow-train config.json run/" in card

    # a model trained on from another: stage 2 of a second run, that run's history instead of one command
    again = tmp_path / "again"
    shutil.copytree(run / "stage2", again / "stage2")
    shutil.copy(run / "config.json", again / "config.json")
    history = tmp_path / "history.md"
    history.write_text("    rwcflow-train second.json again --stages 2 --init-model run/model.safetensors\n")
    assert model_card.main(["--model", str(model), "--run", str(run), "--run", str(again), "--bench", str(out),
                            "--history", str(history), "--out", str(card_path)]) == 0
    card = card_path.read_text()
    assert "| 2 | 2 | 2 |" in card and "--init-model run/model.safetensors" in card
    assert "rwcflow-train config.json run/" not in card
    with pytest.raises(ValueError, match="stage 0"):
        model_card.stage_logs([again], 3)

    bench["model"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="another model file"):
        model_card.model_card(model, [run], bench)

    # the shipped model's training config, printed for a re-run
    assert training.main(["--print-config", "default"]) == (0 if training.default_model_path() else 2)
    capsys.readouterr()
    monkeypatch.setattr(training, "default_model_path", lambda: model)
    assert training.main(["--print-config", "default"]) == 0
    printed = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert printed == TrainConfig.from_dict(read_metadata(model)["provenance"]["training"])
    assert printed.steps == load_config(run / "config.json").steps == (3, 2, 2)
