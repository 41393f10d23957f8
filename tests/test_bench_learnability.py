"""benchmarks/learnability.py: its translated pairs are the known shift of the image, and a real tiny run
writes its table and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from benchmarks import learnability
from rwcflow import train
from rwcflow.datasets import make_source


def test_variants_parse_as_json_words():
    assert learnability.parse_variant("lr=3e-4 motion_channels=64 standardize_costs=false") == {
        "lr": 3e-4, "motion_channels": 64, "standardize_costs": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        learnability.parse_variant("lr 3e-4")


def test_a_translated_pair_is_the_image_shifted_by_its_true_field():
    source = make_source(train.preset("tiny").data)
    pair = learnability.translated_pair(source, torch.Generator().manual_seed(4), shift=2.0)
    offset = pair.true_field[0, :, 0, 0, 0]
    assert torch.equal(pair.true_field, offset.view(1, 3, 1, 1, 1).expand_as(pair.true_field))
    assert 0 < float(offset.abs().max()) <= 2.0
    moving = pair.moving[0, 0].double().numpy()
    grid = np.indices(moving.shape, dtype=float) + offset.double().numpy().reshape(3, 1, 1, 1)
    expected = ndimage.map_coordinates(moving, grid, order=1, mode="nearest")
    inside = (slice(3, -3),) * 3  # away from the border, where padding conventions differ
    np.testing.assert_allclose(pair.fixed[0, 0].numpy()[inside], expected[inside], atol=1e-5)
    assert torch.equal(pair.fixed_mask, (pair.fixed > 0.05).float())


def test_a_tiny_run_writes_relative_losses_per_window(tmp_path):
    out = tmp_path / "learnability.json"
    assert learnability.main(["--preset", "tiny", "--steps", "4", "--window", "2", "--out", str(out), "--device", "cpu",
                              "--variant", "lr=3e-4", "--variant", "lr=1e-3 iterations=1 radius=1"]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    rows = result["rows"]
    assert [row["variant"] for row in rows] == ["lr=3e-4", "lr=1e-3 iterations=1 radius=1"]
    assert [row["lr"] for row in rows] == [3e-4, 1e-3]
    assert rows[1]["network"]["stages"][0]["iterations"] == 1 and rows[1]["network"]["stages"][0]["radius"] == 1
    assert rows[0]["network"]["stages"] == train.preset("tiny").model.to_dict()["stages"]
    for row in rows:
        assert len(row["relative_loss"]) == 2 and all(0 < r < 10 for r in row["relative_loss"])
    assert "| lr=3e-4 |" in out.with_suffix(".md").read_text()
