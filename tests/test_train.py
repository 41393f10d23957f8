"""Stage-wise training: the training forward pass equals inference, loss terms with known values, each stage
learns with the earlier ones frozen, checkpoints resume exactly, the command line, torchrun data parallelism."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from rwcflow import metrics, spatial
from rwcflow.checkpoint import load_model, read_metadata, save_model
from rwcflow.datasets import Pair, PairSource, SyntheticSource
from rwcflow.models import RWCNet, RWCNetConfig, StageConfig, stage_shape
from rwcflow.synth import SynthOptions, synthesize_pair
from rwcflow.train import (
    EXIT_RESUME,
    LossWeights,
    TrainConfig,
    evaluate,
    field_terms,
    load_config,
    main,
    patch_shape,
    prepare_stage,
    sample_patch,
    stage_fields,
    stage_loss,
    train,
    train_stage,
)

SHAPE = (16, 16, 16)


def _toy_pair(seed: int = 0, shape=SHAPE) -> Pair:
    """A synthetic pair (known field, labels, mask) from nested boxes with a smooth texture."""
    labels = torch.zeros((1, 1, *shape), dtype=torch.int64)
    labels[..., 2:14, 2:14, 2:14] = 1
    labels[..., 5:10, 4:11, 6:11] = 2
    labels[..., 10:13, 7:10, 3:7] = 3
    i, j, k = spatial.identity_grid(shape)[0]
    image = ((labels > 0) * (0.6 + 0.2 * torch.sin(i / 2.0) + 0.2 * torch.cos(j / 3.0 + k / 2.5)) * labels).float() / 3
    options = SynthOptions(max_displacement=2.5, control_points=(3, 3), anatomy_displacement=0.0, real_intensity=1.0, gamma=0, bias=0,
                           blur=0, noise=0)
    pair = synthesize_pair(labels, image, options, generator=torch.Generator().manual_seed(seed))
    return Pair(pair.fixed, pair.moving, (2.0, 2.0, 2.0), pair.fixed_labels, pair.moving_labels,
                (pair.fixed_labels > 0).float(), true_field=pair.true_field, name=f"toy-{seed}")


class OnePair(PairSource):
    """Always the same training pair (so that a few steps overfit it), and one validation pair."""

    def __init__(self, pair: Pair):
        self.pair = pair

    def sample(self, generator: torch.Generator) -> Pair:
        return self.pair

    def validation(self) -> list[Pair]:
        return [_toy_pair(seed=9)]


def _config(**changes) -> TrainConfig:
    settings = dict(model=RWCNetConfig.tiny(), steps=(12, 12, 12), learning_rate=2e-3, validate_every=0,
                    checkpoint_every=0, weights=LossWeights(similarity=10.0, dice=0.5, diffusion=0.1, flow=0.2))
    return TrainConfig(**{**settings, **changes})


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# --- config ----------------------------------------------------------------------------------------


def test_config_round_trips_through_json_and_rejects_bad_values(tmp_path):
    config = _config(train_patch_fraction=(1.0, 0.5, 0.5), similarity="ncc")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config
    assert TrainConfig.from_dict({}) == TrainConfig()
    for bad in ({"steps": (1, 2)}, {"similarity": "mi"}, {"lr_schedule": "step"}, {"train_patch_fraction": (1, 1, 0)},
                {"sequence_gamma": 1.5}):
        with pytest.raises(ValueError):
            _config(**bad)
    with pytest.raises(ValueError, match="unknown training config keys: stepz"):
        TrainConfig.from_dict({"stepz": 3})


def test_training_patches_have_the_inference_patch_size_or_the_asked_fraction():
    stage = StageConfig(scale=1.0, iterations=1, radius=1, patches=2)
    assert patch_shape((40, 30, 20), stage, 0.25) == (23, 18, 12)  # axis_patches' size (2 patches, 25 % shared)
    assert patch_shape((40, 30, 20), StageConfig(1.0, 1, 1, 1), 0.25) == (40, 30, 20)
    assert patch_shape((40, 30, 20), stage, 0.25, fraction=0.5) == (20, 15, 10)
    starts = set()
    for seed in range(20):
        index = sample_patch((40, 30, 20), (23, 18, 12), torch.Generator().manual_seed(seed))
        assert [s.stop - s.start for s in index[1:]] == [23, 18, 12]
        assert all(0 <= s.start and s.stop <= n for s, n in zip(index[1:], (40, 30, 20)))
        starts.add(index[1].start)
    assert len(starts) > 5


# --- the training forward pass ----------------------------------------------------------------------


def test_training_forward_on_the_whole_grid_equals_inference():
    """The hand-over from the frozen stage (field resized, moving warped, hidden state resampled) and the
    composition with the starting field are those of ``RWCNet.run_stage``: same fields, train or eval."""
    torch.manual_seed(0)
    config = RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1, 1), StageConfig(1.0, 2, 1, 1)))
    model = RWCNet(config)
    with torch.no_grad():
        for stage in model.stages:
            stage.update.flow_head.conv2.weight.normal_(std=0.05)
    pair = _toy_pair()
    model.freeze_stages([0]).eval()
    whole = (..., *(slice(0, n) for n in SHAPE))
    batch = prepare_stage(model, 1, pair, whole)
    with torch.no_grad():
        trained = stage_fields(model, 1, batch)
        previous = model.run_stage(0, pair.fixed, pair.moving)
        inferred = model.run_stage(1, pair.fixed, pair.moving, previous.field, previous.hidden)
    assert previous.field.abs().max() > 0.05 and batch.hidden is not None
    for a, b in zip(trained, inferred.fields):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(pair.fixed, pair.moving).field, trained[-1], rtol=0, atol=1e-5)


def test_loss_terms_have_their_known_values():
    pair = _toy_pair()
    model = RWCNet(RWCNetConfig.tiny(stages=(StageConfig(1.0, 1, 1, 1),)))
    whole = (..., *(slice(0, n) for n in SHAPE))
    batch = prepare_stage(model, 0, pair, whole)
    config = _config(model=model.config, steps=(1,))
    pair.fixed_keypoints = torch.tensor([[5.0, 6.0, 7.0], [10.0, 12.0, 9.0]])
    pair.moving_keypoints = pair.fixed_keypoints + torch.tensor([1.0, -2.0, 0.5])
    with_points = prepare_stage(model, 0, pair, whole)

    truth = pair.true_field
    exact = field_terms(truth, batch, config)
    assert exact["flow"] == 0
    assert exact["dice"] < 0.1 and exact["similarity"] < 0.5 * field_terms(torch.zeros_like(truth), batch, config)["similarity"]
    offset = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1)
    shifted = field_terms(truth + offset, batch, config)
    assert shifted["flow"].item() == pytest.approx(2.0 * float(offset.norm()), rel=1e-5)  # 2 mm voxels
    assert shifted["diffusion"].item() == pytest.approx(exact["diffusion"].item(), rel=1e-4)
    constant = torch.zeros_like(truth) + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    assert field_terms(constant, with_points, config)["keypoints"].item() == pytest.approx(0.0, abs=1e-6)
    assert field_terms(torch.zeros_like(truth), with_points, config)["keypoints"].item() == pytest.approx(
        2.0 * float(torch.tensor([1.0, -2.0, 0.5]).norm()), rel=1e-5)

    # the sequence loss weights the last iterate most; with gamma 0 only the last one counts
    last_only = _config(model=model.config, steps=(1,), sequence_gamma=0.0)
    loss, terms = stage_loss([torch.zeros_like(truth), truth], batch, last_only)
    weights = last_only.weights
    expected = sum(getattr(weights, name) * value for name, value in exact.items())
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert terms["flow"] == 0


def test_dice_gradient_reaches_the_field():
    pair = _toy_pair()
    model = RWCNet(RWCNetConfig.tiny(stages=(StageConfig(1.0, 1, 1, 1),)))
    batch = prepare_stage(model, 0, pair, (..., *(slice(0, n) for n in SHAPE)))
    field = torch.zeros((1, 3, *SHAPE), requires_grad=True)
    field_terms(field, batch, _config(model=model.config, steps=(1,)))["dice"].backward()
    assert field.grad.abs().sum() > 0


def test_validation_numbers_of_the_identity():
    pairs = [_toy_pair(seed) for seed in (1, 2)]
    scores = evaluate(pairs, [torch.zeros_like(p.true_field) for p in pairs])
    spacing = torch.tensor([2.0, 2.0, 2.0]).view(1, 3, 1, 1, 1)
    epe = [float((p.true_field * spacing).norm(dim=1)[p.fixed_mask[:, 0] > 0].mean()) for p in pairs]
    dice = [metrics.mean_score(metrics.dice(p.fixed_labels, p.moving_labels)) for p in pairs]
    assert scores["epe_mm"] == pytest.approx(np.mean(epe), rel=1e-5)
    assert scores["dice"] == pytest.approx(np.mean(dice), rel=1e-6)
    assert scores["mse"] == pytest.approx(np.mean([float(((p.fixed - p.moving) ** 2).mean()) for p in pairs]), rel=1e-5)
    perfect = evaluate(pairs, [p.true_field for p in pairs])
    assert perfect["epe_mm"] == 0 and perfect["dice"] > scores["dice"]


# --- training ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each stage of the tiny network trained for 12 steps on one pair (whole stage grids), behind the
    untrained earlier stages, frozen."""
    out = tmp_path_factory.mktemp("run")
    config = _config(train_patch_fraction=(1.0, 1.0, 1.0))
    torch.manual_seed(config.seed)
    initial = save_model(RWCNet(config.model), out / "initial.safetensors")
    results = [train_stage(config, k, out, init_model=initial if k else None, source=OnePair(_toy_pair()),
                           progress=False) for k in range(3)]
    return {"out": out, "config": config, "results": results, "initial": load_model(initial).state_dict()}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_each_stage_learns_with_the_earlier_stages_frozen(trained, k):
    result = trained["results"][k]
    rows = [row for row in _csv(result.log) if row["split"] == "train"]
    assert [int(row["step"]) for row in rows] == list(range(1, 13)) and all(float(r["loss"]) > 0 for r in rows)
    assert (trained["out"] / f"stage{k}" / "checkpoint.pt").is_file()

    model = load_model(result.model)
    before, after = trained["initial"], model.state_dict()

    # the loss of the training pair falls
    untrained = RWCNet(model.config)
    untrained.load_state_dict(before)
    config, pair = trained["config"], _toy_pair()

    def loss(network):
        network.eval().freeze_stages(range(k))
        whole = (..., *(slice(0, n) for n in stage_shape(SHAPE, network.config.stages[k].scale)))
        batch = prepare_stage(network, k, pair, whole)
        with torch.no_grad():
            return stage_loss(stage_fields(network, k, batch), batch, config)[0].item()

    assert loss(model) < 0.85 * loss(untrained)
    for name in after:
        changed = not torch.equal(after[name], before[name])
        if name.startswith(f"stages.{k}.") and name.endswith("weight"):
            assert changed, name
        if any(name.startswith(f"stages.{j}.") for j in range(k)):
            assert not changed, f"frozen stage parameter {name} changed"
    provenance = read_metadata(result.model)["provenance"]
    trained_config = trained["config"].to_dict()  # as run: with the voxel size of its data
    trained_config["model"]["input_spacing_mm"] = round(float(np.mean(pair.spacing)), 3)
    assert provenance["trained_stages"] == k + 1 and provenance["training"] == trained_config
    assert model.config.input_spacing_mm == trained_config["model"]["input_spacing_mm"]
    assert set(provenance["validation"]) == {"mse", "dice", "epe_mm"}


def test_a_finished_stage_is_not_trained_again(trained):
    result = trained["results"][0]
    stamp = result.model.stat().st_mtime_ns
    again = train_stage(trained["config"], 0, trained["out"], source=OnePair(_toy_pair()), progress=False)
    assert again.model.stat().st_mtime_ns == stamp and again.validation == result.validation


def test_resume_continues_from_the_saved_step(tmp_path):
    config = _config(model=RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1, 2),), dropout=0.3), steps=(6,),
                     checkpoint_every=2)  # random patches and dropout: both must continue as they would have
    source = OnePair(_toy_pair())
    whole = train_stage(config, 0, tmp_path / "whole", source=source, progress=False)

    assert train_stage(config, 0, tmp_path / "pieces", source=source, stop_at=3, progress=False) is None
    state = torch.load(tmp_path / "pieces" / "stage0" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    resumed = train_stage(config, 0, tmp_path / "pieces", source=source, progress=False)
    assert [int(row["step"]) for row in _csv(resumed.log) if row["split"] == "train"] == list(range(1, 7))
    for (name, a), b in zip(whole.network.state_dict().items(), resumed.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # the same as without interruption


def test_synthetic_pairs_made_in_the_training_process_train_as_those_of_loader_processes(tmp_path):
    source = SyntheticSource(["mni152"], resolution_mm=8.0, validation_pairs=1)
    config = _config(model=RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1),)), steps=(3,), num_workers=1)
    loaded = train_stage(config, 0, tmp_path / "loader", source=source, progress=False)
    made_here = train_stage(replace(config, synthesize_on_device=True), 0, tmp_path / "here", source=source,
                            progress=False)
    for (name, a), b in zip(loaded.network.state_dict().items(), made_here.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert made_here.validation == loaded.validation


def test_train_runs_every_stage_and_saves_the_config(tmp_path):
    config = _config(steps=(2, 2, 2), batch_size=2)
    final = train(config, tmp_path, source=OnePair(_toy_pair()), progress=False)
    assert final == tmp_path / "model.safetensors"
    assert load_config(tmp_path / "config.json") == config
    model = load_model(final)
    for k in range(3):
        stage_model = load_model(tmp_path / f"stage{k}" / "model.safetensors")
        for name, value in stage_model.state_dict().items():
            if name.startswith(f"stages.{k}."):
                assert torch.equal(value, model.state_dict()[name])  # no later stage changed it
    with torch.no_grad():
        output = model(*(torch.rand(1, 1, 16, 16, 16) for _ in range(2)))
    assert len(output.stages) == 3 and output.field.shape == (1, 3, 16, 16, 16)


def test_time_limit_stops_checkpointed_and_the_next_run_goes_on(tmp_path, capsys):
    config = _config(model=RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1, 1), StageConfig(1.0, 1, 1, 1))),
                     steps=(3, 2))
    source = OnePair(_toy_pair())
    assert train(config, tmp_path, source=source, time_limit_s=0, progress=False) is None  # after one step
    assert torch.load(tmp_path / "stage0" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "stage0" / "model.safetensors").exists()
    assert train(config, tmp_path, source=source, progress=False) == tmp_path / "model.safetensors"
    assert [int(row["step"]) for row in _csv(tmp_path / "stage0" / "log.csv") if row["split"] == "train"] == [1, 2, 3]

    path = tmp_path / "config.json"
    config = TrainConfig.from_dict({**config.to_dict(), "data": {
        "kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 10.0, "validation_pairs": 1}})
    path.write_text(json.dumps(config.to_dict()))
    capsys.readouterr()
    assert main([str(path), str(tmp_path / "run"), "--quiet", "--time-limit", "0"]) == EXIT_RESUME
    assert "time limit" in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "stage0" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert main([str(path), str(tmp_path / "run"), "--quiet", "--time-limit", "60"]) == 0
    assert load_model(tmp_path / "run" / "model.safetensors").provenance["trained_stages"] == 2


def test_stage_needs_the_earlier_stages():
    with pytest.raises(ValueError, match="needs the model trained up to stage 0"):
        train_stage(_config(), 1, "unused", source=OnePair(_toy_pair()))


def test_command_line(tmp_path, capsys):
    assert main(["--print-config", "tiny"]) == 0
    config = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    config = TrainConfig.from_dict({**config.to_dict(), "steps": [2, 2, 1], "data": {
        "kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 10.0, "validation_pairs": 1}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert main([str(path), str(tmp_path / "run"), "--quiet", "--stages", "0", "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "stage0" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists()  # only stage 0 was asked for
    assert main([str(path), str(tmp_path / "run"), "--quiet", "--stages", "1", "--stop-at", "1"]) == 0
    assert torch.load(tmp_path / "run" / "stage1" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert main([str(path), str(tmp_path / "run"), "--quiet"]) == 0
    final = load_model(tmp_path / "run" / "model.safetensors")
    assert final.provenance["trained_stages"] == 3
    assert final.config.input_spacing_mm == 10.0  # the data's voxel size, for register() to run it at


# --- torchrun data parallelism ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One process as ``torchrun`` starts it: rank and rendezvous in the environment."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = _config(model=RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1, 1),)), steps=(3,))
    source = OnePair(_toy_pair(seed=rank))  # each process its own data
    result = train_stage(config, 0, out, source=source, progress=False)
    torch.save(result.network.state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_data_parallel_training_over_two_processes_keeps_them_in_step(tmp_path):
    # forked, as the suite runs torch on one thread (spawned processes would spend 10 s importing)
    context = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two training processes did not finish within 60 s")
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    initial = RWCNet(RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1, 1),))).state_dict()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(first[name], initial[name]) for name in first)
    saved = load_model(tmp_path / "stage0" / "model.safetensors")
    assert saved.provenance["world_size"] == 2
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0)


def _csv(path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
