"""Training workflow: the stages of RWCNet trained one after the other, one :class:`~rwcflow.tasks.TrainStage`
job each, so that a training run is submitted like any other workflow (``Submitter(worker="slurm")``)."""

from __future__ import annotations

from fileformats.generic import File
from pydra.compose import workflow

from rwcflow.tasks import TrainStage
from rwcflow.train import load_config


@workflow.define(outputs={"model": File, "log": File, "validation": dict})
def Training(config: File, device: str | None = None, work_dir: str | None = None):
    """Train every stage of the network of ``config`` (a training config file; it must exist when the
    workflow is built, which reads its number of stages), each job starting from the previous one's model.

    Inputs: ``config``; ``device`` (overrides the config's: ``"auto"``, ``"cpu"``, ``"cuda"``);
    ``work_dir`` (where checkpoints go, one ``stage<k>`` folder per stage, so that a resubmitted run
    resumes; default: each job's own folder).

    Outputs: ``model`` (the trained network, a safetensors model file for ``--model``), ``log`` (the
    last stage's CSV log) and ``validation`` (its final validation numbers).
    """
    model = None
    for k in range(len(load_config(config).model.stages)):
        stage = workflow.add(TrainStage(config=config, stage=k, init_model=model, work_dir=work_dir, device=device),
                             name=f"stage{k}")
        model = stage.model
    return stage.model, stage.log, stage.validation
