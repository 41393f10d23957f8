"""Model files: round trip, safe loading, and one clear error per kind of bad file."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from rwcflow import checkpoint
from rwcflow.errors import ModelFileError
from rwcflow.models import RWCNet, RWCNetConfig


@pytest.fixture
def tiny_model() -> RWCNet:
    torch.manual_seed(0)
    return RWCNet(RWCNetConfig.tiny()).eval()


def test_round_trip_gives_the_same_network(tmp_path, tiny_model, smooth_volume):
    path = checkpoint.save_model(tiny_model, tmp_path / "model.safetensors", provenance={"data": "unit test"})
    loaded = checkpoint.load_model(path)
    assert loaded.config == tiny_model.config
    assert loaded.provenance["data"] == "unit test"
    assert "rwcflow_version" in loaded.provenance
    fixed, moving = smooth_volume((24, 20, 16), seed=1), smooth_volume((24, 20, 16), seed=2)
    with torch.no_grad():
        expected = tiny_model(fixed, moving).field
        got = loaded(fixed, moving).field
    assert torch.equal(expected, got)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary file left behind"


def test_metadata_records_format_and_config(tmp_path, tiny_model):
    path = checkpoint.save_model(tiny_model, tmp_path / "model.safetensors")
    metadata = checkpoint.read_metadata(path)
    assert RWCNetConfig.from_dict(metadata["config"]) == tiny_model.config


def test_version_1_files_load_as_networks_reading_raw_costs(tmp_path, tiny_model):
    config = tiny_model.config.to_dict()
    del config["standardize_costs"]
    path = _write_safetensors(tmp_path / "v1.safetensors", tiny_model.state_dict(),
                              {"format": "rwcflow-model", "format_version": "1", "config": json.dumps(config)})
    loaded = checkpoint.load_model(path)
    assert loaded.config.standardize_costs is False
    assert not loaded.stages[0].update.encoder.standardize
    assert checkpoint.load_model(checkpoint.save_model(tiny_model, tmp_path / "v2.safetensors")).config.standardize_costs


def _write_safetensors(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def _bad_files(tmp_path, tiny_model):
    good = checkpoint.save_model(tiny_model, tmp_path / "good.safetensors")
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    config = json.dumps(tiny_model.config.to_dict())
    other = RWCNetConfig.tiny(hidden_channels=8)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.pt"
    torch.save(tiny_model.state_dict(), pickled)
    return {
        "missing": (tmp_path / "absent.safetensors", "not found"),
        "text": (_text(tmp_path / "notes.safetensors"), "not a readable safetensors"),
        "truncated": (truncated, "not a readable safetensors"),
        "pickle": (pickled, "not a readable safetensors"),
        "foreign": (_write_safetensors(tmp_path / "foreign.safetensors", state, {"framework": "x"}),
                    "not an rwcflow model file"),
        "version": (_write_safetensors(tmp_path / "version.safetensors", state,
                                       {"format": "rwcflow-model", "format_version": "99", "config": config}),
                    "format version '99' is not supported"),
        "bad config": (_write_safetensors(tmp_path / "config.safetensors", state,
                                          {"format": "rwcflow-model", "format_version": "1",
                                           "config": json.dumps({"no_such_key": 1})}),
                       "config is not valid"),
        "mismatch": (_write_safetensors(tmp_path / "mismatch.safetensors", state,
                                        {"format": "rwcflow-model", "format_version": "1",
                                         "config": json.dumps(other.to_dict())}),
                     "do not match the network"),
    }


def _text(path):
    path.write_text("this is not a model\n")
    return path


def test_bad_model_files_give_one_clear_line(tmp_path, tiny_model):
    for name, (path, problem) in _bad_files(tmp_path, tiny_model).items():
        with pytest.raises(ModelFileError) as info:
            checkpoint.load_model(path)
        message = str(info.value)
        assert message.startswith(str(path)), name
        assert problem in message, (name, message)
        assert "\n" not in message, name


def test_inference_network_on_cpu_is_channels_last_with_the_same_field(tmp_path, tiny_model, smooth_volume):
    path = checkpoint.save_model(tiny_model, tmp_path / "model.safetensors")
    network = checkpoint.resolve_model(str(path), device="cpu")
    convolutions = [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convolutions)
    fixed, moving = smooth_volume((24, 20, 16), seed=1), smooth_volume((24, 20, 16), seed=2)
    with torch.no_grad():
        expected = checkpoint.load_model(path)(fixed, moving).field
        got = network(fixed, moving).field
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_resolve_model_spellings(tmp_path, tiny_model, caplog, monkeypatch):
    assert checkpoint.resolve_model(None) is None
    assert checkpoint.resolve_model("none") is None
    assert checkpoint.resolve_model(tiny_model) is tiny_model
    path = checkpoint.save_model(tiny_model, tmp_path / "m.safetensors")
    assert isinstance(checkpoint.resolve_model(str(path)), RWCNet)
    if checkpoint.default_model_path() is None:
        monkeypatch.setattr(checkpoint, "_fallback_announced", False)
        with caplog.at_level(logging.WARNING, logger="rwcflow.checkpoint"):
            assert checkpoint.resolve_model("default") is None
            assert checkpoint.resolve_model("default") is None
        assert sum("instance optimisation alone" in r.message for r in caplog.records) == 1
    else:
        assert isinstance(checkpoint.resolve_model("default"), RWCNet)


def test_the_shipped_model_loads_safely_and_runs_all_three_stages(smooth_volume):
    """The default model inside the package (rwcflow/data/default.safetensors, its card beside it) loads
    from safetensors alone and runs its three stages on a small pair, each stage on its own grid."""
    path = checkpoint.default_model_path()
    assert path is not None and path.with_suffix(".md").is_file()
    network = checkpoint.resolve_model("default")
    assert isinstance(network, RWCNet) and len(network.stages) == 3
    fixed, moving = smooth_volume((32, 32, 32), seed=1), smooth_volume((32, 32, 32), seed=2)
    with torch.no_grad():
        output = network(fixed, moving, return_hidden=False)
    grids = [tuple(stage.field.shape[2:]) for stage in output.stages]
    assert grids == [(8, 8, 8), (16, 16, 16), (32, 32, 32)]
    assert output.field.shape == (1, 3, 32, 32, 32) and torch.isfinite(output.field).all()
    assert output.field.abs().max() > 0.01
