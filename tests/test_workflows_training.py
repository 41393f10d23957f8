"""The TrainStage task and the Training workflow, submitted for real with the "cf" worker on a tiny config."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import torch

from rwcflow.anatomy import load_anatomy
from rwcflow.checkpoint import load_model
from rwcflow.models import RWCNetConfig
from rwcflow.tasks import TrainStage
from rwcflow.train import LossWeights, TrainConfig, load_config, train_stage
from rwcflow.workflows.training import Training

DATA = {"kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 10.0, "validation_pairs": 1}


def _config(tmp_path, steps=(2, 2, 1)):
    load_anatomy("mni152", 10.0)  # cached here, so the forked jobs need not build it again
    config = TrainConfig(model=RWCNetConfig.tiny(), data=DATA, steps=steps, validate_every=0, checkpoint_every=1,
                         weights=LossWeights(flow=0.5), learning_rate=2e-3)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


def test_training_workflow_trains_the_stages_in_turn(tmp_path, submit):
    config = _config(tmp_path)
    out = submit(Training(config=config, device="cpu", work_dir=str(tmp_path / "run")))
    model = load_model(out.model)
    assert model.config == replace(load_config(config).model, input_spacing_mm=DATA["resolution_mm"])
    assert model.provenance["trained_stages"] == 3
    assert set(out.validation) == {"mse", "dice", "epe_mm"}
    assert [row["step"] for row in csv.DictReader(open(out.log)) if row["split"] == "train"] == ["1"]
    # each job froze the stages before its own: stage k's weights are those of the job that trained it
    final = model.state_dict()
    for k in range(3):
        trained = load_model(tmp_path / "run" / f"stage{k}" / "model.safetensors").state_dict()
        for name, value in trained.items():
            if any(name.startswith(f"stages.{j}.") for j in range(k + 1)):
                assert torch.equal(value, final[name]), name


def test_train_stage_job_resumes_from_its_work_dir(tmp_path, submit):
    config = _config(tmp_path, steps=(3, 1, 1))
    work = tmp_path / "work"
    assert train_stage(load_config(config), 0, work, stop_at=2, progress=False) is None  # an interrupted job
    first_rows = list(csv.DictReader(open(work / "stage0" / "log.csv")))
    out = submit(TrainStage(config=config, stage=0, work_dir=str(work), device="cpu"))
    rows = [row for row in csv.DictReader(open(out.log)) if row["split"] == "train"]
    assert [row["step"] for row in rows] == ["1", "2", "3"]
    assert rows[:2] == [row for row in first_rows if row["split"] == "train"]  # steps 1-2 were not redone
    assert load_model(out.model).provenance["trained_stages"] == 1
