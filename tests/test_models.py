"""RWCNet network: config, cost volume, GRU, stages, hand-over between stages, patches, training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rwcflow import spatial
from rwcflow.losses import diffusion_loss, mse_loss
from rwcflow.models import corr
from rwcflow.models import (
    ConvGRU,
    Encoder,
    FeatureEncoder,
    MotionEncoder,
    RWCNet,
    RWCNetConfig,
    StageConfig,
    axis_patches,
    correlation,
    patch_regions,
    resize,
    resize_region,
    run_patched,
    search_offsets,
    standardize_costs,
)


def _tiny(**changes) -> RWCNet:
    torch.manual_seed(0)
    return RWCNet(RWCNetConfig.tiny(**changes))


def _scale_flow_heads(model: RWCNet, std: float) -> None:
    """Give the flow heads' output layers random weights of ``std`` so the fields are a few voxels."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in model.stages:
            weight = stage.update.flow_head.conv2.weight
            weight.copy_(std * torch.randn(weight.shape, generator=generator))


def _translated_pair(smooth_volume, shape, shift):
    """A smooth volume and a copy moved by ``shift`` voxels: ``moving(x + shift) = fixed(x)``."""
    fixed = smooth_volume(shape, sigma=2.0)
    field = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    return fixed, spatial.warp(fixed, -field)


# --- configuration ---------------------------------------------------------------------------------


def test_default_config_is_the_paper_network():
    config = RWCNetConfig()
    assert [s.scale for s in config.stages] == [0.25, 0.5, 1.0]
    assert [s.iterations for s in config.stages] == [12, 12, 4]
    assert [s.radius for s in config.stages] == [3, 3, 2]
    assert [s.patches for s in config.stages] == [1, 2, 2]
    assert (config.feature_channels, config.hidden_channels, config.flow_head_channels) == (16, 64, 128)
    assert config.dropout == 0.5 and 0 < config.patch_overlap < 0.5
    stage = RWCNet(config).stages[0]
    assert stage.update.encoder.match[0].in_channels == 7**3
    assert stage.update.flow_head.conv1.out_channels == 128 and stage.update.flow_head.conv2.out_channels == 3
    assert stage.update.gru.convz.out_channels == 64


def test_config_round_trips_through_json():
    config = RWCNetConfig.tiny(diffeomorphic=True, use_correlation=False, patch_overlap=0.3)
    restored = RWCNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert RWCNetConfig.from_dict(RWCNetConfig().to_dict()) == RWCNetConfig()
    assert RWCNetConfig.from_dict({}) == RWCNetConfig()


@pytest.mark.parametrize(
    "changes",
    [
        {"stages": ()},
        {"encoder_filters": 12},
        {"encoder_blocks_up": (1, 1)},
        {"patch_overlap": 1.0},
        {"dropout": -0.1},
        {"motion_channels": 6},
    ],
)
def test_config_rejects_invalid_values(changes):
    with pytest.raises(ValueError):
        RWCNetConfig.tiny(**changes)


def test_config_rejects_invalid_stages_and_unknown_keys():
    for bad in ({"scale": 0.0, "iterations": 1, "radius": 1}, {"scale": 1.0, "iterations": 0, "radius": 1}):
        with pytest.raises(ValueError):
            StageConfig(**bad)
    with pytest.raises(ValueError, match="unknown RWCNet config keys: hiden"):
        RWCNetConfig.from_dict({"hiden": 3})


# --- encoders and cost volume --------------------------------------------------------------------


def test_encoder_accepts_any_grid_size():
    torch.manual_seed(0)
    config = RWCNetConfig.tiny(encoder_blocks_down=(1, 1, 1), encoder_blocks_up=(1, 1))
    encoder = Encoder(2, 5, config)
    assert encoder(torch.rand(2, 2, 7, 9, 6)).shape == (2, 5, 7, 9, 6)


def test_feature_dropout_drops_the_same_channels_of_fixed_and_moving():
    config = RWCNetConfig.tiny(dropout=0.5)
    torch.manual_seed(0)
    encoder = FeatureEncoder(config).train()
    image = torch.rand(2, 1, 8, 8, 8)
    fixed_features, moving_features = encoder(image, image)
    assert torch.equal(fixed_features, moving_features)
    dropped = [encoder(image, image)[0] for _ in range(2)]
    assert not torch.equal(dropped[0], dropped[1])  # dropout is active, yet the pair stays comparable
    encoder.eval()
    assert torch.equal(*encoder(image, image)) and torch.equal(encoder(image, image)[0], encoder(image, image)[0])


def test_correlation_of_identical_features_is_zero_at_zero_offset():
    features = torch.rand(2, 4, 6, 7, 5)
    cost = correlation(features, features, radius=2)
    assert cost.shape == (2, 125, 6, 7, 5)
    assert torch.equal(cost[:, search_offsets(2).index((0, 0, 0))], torch.zeros(2, 6, 7, 5))
    assert (cost.min(dim=1).values == 0).all()


def test_correlation_of_linear_features_has_known_value():
    # f_c(x) = a_c . x, so |f_c(x) - f_c(x + d)| = |a_c . d| everywhere away from the border.
    slopes = torch.tensor([[1.0, 0.0, 0.0], [0.5, -2.0, 1.0], [0.0, 0.0, 3.0]])
    grid = spatial.identity_grid((10, 10, 10))
    features = torch.einsum("cd,bdxyz->bcxyz", slopes, grid)
    radius = 2
    cost = correlation(features, features, radius)
    inner = cost[..., radius + 1 : -radius - 1, radius + 1 : -radius - 1, radius + 1 : -radius - 1]
    for k, offset in enumerate(search_offsets(radius)):
        expected = (slopes @ torch.tensor(offset, dtype=torch.float32)).abs().mean()
        torch.testing.assert_close(inner[:, k], expected.expand_as(inner[:, k]), rtol=1e-5, atol=1e-5)


def test_correlation_minimum_is_at_the_displacement():
    shift = (2, -1, 1)
    fixed = torch.rand(1, 3, 12, 12, 12)
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))  # moving(x + shift) = fixed(x)
    cost = correlation(fixed, moving, radius=2)[..., 3:-3, 3:-3, 3:-3]
    best = search_offsets(2).index(shift)
    assert (cost.argmin(dim=1) == best).all()
    assert cost[:, best].abs().max() < 1e-6


def test_standardized_costs_keep_the_ranking_and_ignore_the_features_scale():
    torch.manual_seed(0)
    fixed, moving = torch.rand(1, 4, 6, 7, 5), torch.rand(1, 4, 6, 7, 5)
    cost = correlation(fixed, moving, radius=1)
    standard = standardize_costs(cost, eps=0.0)
    torch.testing.assert_close(standard.mean(dim=1), torch.zeros(1, 6, 7, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(standard.pow(2).mean(dim=1), torch.ones(1, 6, 7, 5))
    assert torch.equal(standard.argmin(dim=1), cost.argmin(dim=1))
    scaled = standardize_costs(correlation(3 * fixed + 1, 3 * moving + 1, radius=1), eps=0.0)
    torch.testing.assert_close(scaled, standard, atol=1e-4, rtol=1e-4)
    assert torch.equal(standardize_costs(torch.full((1, 27, 2, 2, 2), 0.3)), torch.zeros(1, 27, 2, 2, 2))


def test_motion_encoder_reads_standardized_or_raw_costs():
    torch.manual_seed(0)
    fixed, moving = torch.rand(1, 4, 6, 7, 5), torch.rand(1, 4, 6, 7, 5)
    raw = MotionEncoder(4, 8, radius=1, standardize=False).compare(fixed, moving)
    assert torch.equal(raw, correlation(fixed, moving, 1))
    assert torch.equal(MotionEncoder(4, 8, radius=1).compare(fixed, moving), standardize_costs(raw))
    assert not RWCNet(RWCNetConfig.tiny(standardize_costs=False)).stages[0].update.encoder.standardize


def test_correlation_box_filter_pads_with_zeros():
    # A constant difference of 1 for every offset, averaged over the 3x3x3 voxels around each voxel that
    # lie inside the grid (the rest count as 0): 8/27 at a corner, 12/27 on an edge, 18/27 on a face.
    fixed, moving = torch.ones(2, 3, 4, 5, 4), torch.zeros(2, 3, 4, 5, 4)
    cost = correlation(fixed, moving, radius=2)
    x, y = torch.tensor([2.0, 3.0, 3.0, 2.0]), torch.tensor([2.0, 3.0, 3.0, 3.0, 2.0])  # voxels inside per axis
    expected = torch.einsum("i,j,k->ijk", x, y, x) / 27
    torch.testing.assert_close(cost, expected.expand(2, 125, 4, 5, 4))


def _offsets_per_chunk(monkeypatch, offsets: int) -> None:
    """The cost volume a chunk of ``offsets`` at a time, as on a GPU (one at a time on a CPU)."""
    monkeypatch.setattr(corr, "_chunk_size", lambda features: offsets)


@pytest.mark.parametrize("batch, radius, offsets_per_chunk", [(1, 1, 1), (2, 2, 1), (2, 2, 4)])
def test_correlation_gradient_is_exact(batch, radius, offsets_per_chunk, monkeypatch):
    fixed = torch.rand(batch, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    moving = torch.rand(batch, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    _offsets_per_chunk(monkeypatch, offsets_per_chunk)
    assert torch.autograd.gradcheck(lambda f, m: correlation(f, m, radius), (fixed, moving), fast_mode=True)


def test_correlation_in_chunks_of_offsets_equals_one_offset_at_a_time(monkeypatch):
    fixed, moving = (torch.rand(2, 3, 6, 7, 5, requires_grad=True) for _ in range(2))
    weights = torch.rand(2, 125, 6, 7, 5)

    def cost_and_gradients():
        cost = correlation(fixed, moving, radius=2)
        return cost, torch.autograd.grad((cost * weights).sum(), (fixed, moving))

    one_at_a_time = cost_and_gradients()
    _offsets_per_chunk(monkeypatch, 10)  # three chunks per plane of 25 offsets, the last of 5
    torch.testing.assert_close(cost_and_gradients(), one_at_a_time)


# --- update block -------------------------------------------------------------------------------


def test_gru_reset_gate_has_its_own_weights():
    torch.manual_seed(0)
    gru = ConvGRU(hidden_channels=4, input_channels=3)
    assert len({gru.convz.weight.data_ptr(), gru.convr.weight.data_ptr(), gru.convq.weight.data_ptr()}) == 3
    hidden, x = torch.rand(1, 4, 5, 5, 5), torch.rand(1, 3, 5, 5, 5)
    before = gru(hidden, x)
    with torch.no_grad():
        gru.convr.weight.add_(0.5)
    assert (gru(hidden, x) - before).abs().max() > 1e-3
    (gru(hidden, x).sum()).backward()
    assert gru.convr.weight.grad.abs().sum() > 0


# --- stages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_stage_trains_with_earlier_stages_frozen(smooth_volume, k):
    model = _tiny().train()
    model.freeze_stages(range(k))
    assert all(not model.stages[j].training for j in range(k)) and model.stages[k].training
    fixed, moving = smooth_volume((16, 16, 16), seed=1), smooth_volume((16, 16, 16), seed=2)
    output = model(fixed, moving, stages=range(k + 1))
    shape = output.stages[k].field.shape[2:]
    stage_fixed, stage_moving = resize(fixed, shape), resize(moving, shape)
    loss = sum(mse_loss(stage_fixed, spatial.warp(stage_moving, f)) for f in output.stages[k].fields)
    loss.backward()
    for name, parameter in model.stages[k].named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for j in range(k) for p in model.stages[j].parameters())


def test_training_steps_reduce_the_loss(smooth_volume):
    model = _tiny(stages=(StageConfig(scale=1.0, iterations=2, radius=1),))
    shift = torch.tensor([1.5, -1.0, 0.5])
    fixed, moving = _translated_pair(smooth_volume, (10, 10, 10), shift.tolist())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        field = model(fixed, moving).field
        loss = mse_loss(fixed, spatial.warp(moving, field)) + 0.1 * diffusion_loss(field)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
    assert (field.mean(dim=(0, 2, 3, 4)) - shift).norm() < 0.5 * shift.norm()  # towards the true shift


def test_zero_flow_head_gives_zero_field_of_the_input_shape():
    model = _tiny()
    with torch.no_grad():
        for stage in model.stages:
            stage.update.flow_head.conv2.weight.zero_()
            stage.update.flow_head.conv2.bias.zero_()
    fixed, moving = torch.rand(2, 1, 16, 12, 20), torch.rand(2, 1, 16, 12, 20)
    output = model(fixed, moving)
    assert output.field.shape == (2, 3, 16, 12, 20)
    assert torch.equal(output.field, torch.zeros_like(output.field))
    assert [s.field.shape[2:] for s in output.stages] == [(4, 3, 5), (8, 6, 10), (16, 12, 20)]
    assert [len(s.fields) for s in output.stages] == [3, 3, 2]
    assert output.hidden.shape == (2, 16, 16, 12, 20)
    lean = model(fixed, moving, return_hidden=False)
    assert lean.hidden is None and lean.stages[1].hidden is not None
    assert torch.equal(lean.field, output.field)


def test_stage_rescales_the_previous_field_to_its_voxels():
    # Grids share their corner voxel centres: a shift of 3 voxels of the 17-voxel input grid is
    # 3 * 4 / 16 voxels of a 5-voxel grid and 3 * 7 / 16 voxels of stage 1's 8-voxel grid.
    model = _tiny()
    with torch.no_grad():  # a flow head that adds nothing: the stage's field is the previous one rescaled
        model.stages[1].update.flow_head.conv2.weight.zero_()
        model.stages[1].update.flow_head.conv2.bias.zero_()
    fixed = torch.rand(1, 1, 17, 17, 17)
    previous = torch.zeros(1, 3, 5, 5, 5)
    previous[:, 0] = 3 * 4 / 16
    output = model.run_stage(1, fixed, fixed, init_field=previous)
    assert output.field.shape == (1, 3, 8, 8, 8)
    torch.testing.assert_close(output.field[:, 0], torch.full((1, 8, 8, 8), 3 * 7 / 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(output.field[:, 1:], torch.zeros(1, 2, 8, 8, 8), rtol=0, atol=1e-5)


def test_stage_composes_its_residual_with_the_previous_field():
    # A flow head with only a bias adds the constant r = iterations * bias; the stage's field must be
    # r + init(x + r) (composition), not r + init(x). Here init(x) shifts axis 0 by 0.1 * x_1.
    model = _tiny()
    bias = torch.tensor([0.5, -0.25, 0.25])
    with torch.no_grad():
        model.stages[2].update.flow_head.conv2.weight.zero_()
        model.stages[2].update.flow_head.conv2.bias.copy_(bias)
    shape = (16, 16, 16)
    init = torch.zeros(1, 3, *shape)
    init[:, 0] = 0.1 * spatial.identity_grid(shape)[:, 1]
    fixed = torch.rand(1, 1, *shape)
    output = model.run_stage(2, fixed, fixed, init_field=init)
    residual = 2 * bias  # two iterations
    expected = residual.view(1, 3, 1, 1, 1) + spatial.warp(init, residual.view(1, 3, 1, 1, 1).expand(1, 3, *shape))
    torch.testing.assert_close(output.field, expected, rtol=0, atol=1e-4)
    core = (slice(2, -2),) * 3  # where x + r stays inside the grid
    analytic = residual[0] + 0.1 * (spatial.identity_grid(shape)[0, 1] + residual[1])
    torch.testing.assert_close(output.field[0, 0][core], analytic[core], rtol=0, atol=1e-4)


def test_diffeomorphic_switch_changes_the_field_and_keeps_jacobians_positive(smooth_volume):
    plain = _tiny(stages=(StageConfig(scale=1.0, iterations=3, radius=1),))
    diffeomorphic = _tiny(stages=plain.config.stages, diffeomorphic=True)
    _scale_flow_heads(plain, 0.2)
    diffeomorphic.load_state_dict(plain.state_dict())
    fixed, moving = smooth_volume((16, 16, 16), seed=1), smooth_volume((16, 16, 16), seed=2)
    with torch.no_grad():
        u_plain, u_diffeo = plain(fixed, moving).field, diffeomorphic(fixed, moving).field
    assert u_plain.abs().max() > 1.5
    assert (u_plain - u_diffeo).abs().max() > 0.5
    assert spatial.jacobian_determinant(u_plain).min() < 0
    assert spatial.jacobian_determinant(u_diffeo).min() > 0


def test_use_correlation_false_concatenates_features(smooth_volume):
    model = _tiny(use_correlation=False)
    assert model.stages[0].update.encoder.match[0].in_channels == 2 * model.config.feature_channels
    fixed, moving = smooth_volume((16, 16, 16), seed=1), smooth_volume((16, 16, 16), seed=2)
    output = model(fixed, moving, stages=[0])
    output.field.abs().sum().backward()
    assert all(p.grad is not None for p in model.stages[0].parameters())


def test_single_resolution_config(smooth_volume):
    model = _tiny(stages=(StageConfig(scale=1.0, iterations=2, radius=1, patches=2),))
    fixed, moving = smooth_volume((12, 12, 12), seed=1), smooth_volume((12, 12, 12), seed=2)
    output = model(fixed, moving)
    assert len(output.stages) == 1 and output.field.shape == (1, 3, 12, 12, 12)
    assert torch.equal(output.field, output.stages[0].field)


# --- hand-over between stages -------------------------------------------------------------------


def test_hidden_state_hand_over_is_the_same_in_train_and_eval(smooth_volume):
    model = _tiny()
    _scale_flow_heads(model, 0.05)
    fixed, moving = smooth_volume((16, 16, 16), seed=1), smooth_volume((16, 16, 16), seed=2)
    with torch.no_grad():
        trained = model.train()(fixed, moving)
        evaluated = model.eval()(fixed, moving)
    torch.testing.assert_close(trained.field, evaluated.field, rtol=0, atol=1e-6)
    torch.testing.assert_close(trained.hidden, evaluated.hidden, rtol=0, atol=1e-6)


def test_next_stage_starts_from_the_previous_hidden_state(smooth_volume):
    model = _tiny()
    _scale_flow_heads(model, 0.05)
    stage = model.stages[1]
    fixed, moving = smooth_volume((8, 8, 8), seed=1), smooth_volume((8, 8, 8), seed=2)
    field = torch.zeros(1, 3, 8, 8, 8)
    previous = torch.randn(1, 16, 8, 8, 8)
    with torch.no_grad():
        handed_over = stage.initial_hidden(field, moving, previous) - stage.initial_hidden(field, moving)
        torch.testing.assert_close(handed_over, previous)
        first = model.run_stage(1, fixed, moving, init_hidden=previous[..., ::2, ::2, ::2])
        second = model.run_stage(1, fixed, moving, init_hidden=previous[..., ::2, ::2, ::2] + 0.5)
    assert (first.field - second.field).abs().max() > 1e-3


# --- patches -------------------------------------------------------------------------------------


def test_patches_cover_the_grid_with_the_requested_overlap():
    assert axis_patches(80, 1, 0.25) == [(0, 80)]
    assert axis_patches(80, 2, 0.0) == [(0, 40), (40, 40)]
    (first, size), (second, _) = axis_patches(80, 2, 0.25)
    assert first == 0 and second + size == 80
    assert (first + size - second) / size == pytest.approx(0.25, abs=0.02)
    regions = patch_regions((10, 12, 9), 2, 0.25)
    assert len(regions) == 8
    total = torch.zeros(1, 1, 10, 12, 9)
    for index, weight in regions:
        assert weight.min() > 0
        total[index] += weight
    torch.testing.assert_close(total, torch.ones_like(total))  # the ramps add up to one


def test_resize_region_is_a_region_of_the_resized_volume():
    volume = torch.rand(2, 4, 5, 7, 6)
    index = (..., slice(3, 9), slice(0, 5), slice(7, 11))
    torch.testing.assert_close(resize_region(volume, (9, 13, 11), index), resize(volume, (9, 13, 11))[index])
    whole = (..., slice(None), slice(2, None), slice(None, 4))  # open slices, as numpy's
    torch.testing.assert_close(resize_region(volume, (9, 13, 11), whole), resize(volume, (9, 13, 11))[whole])


def test_patched_identity_reproduces_its_input():
    volume = torch.rand(2, 3, 11, 14, 9)
    (blended,) = run_patched(lambda index: [volume[index]], volume, count=2, overlap=0.3)
    torch.testing.assert_close(blended, volume)


def test_patched_translation_equivariant_filter_has_no_seams(smooth_volume):
    # A zero-padded smoothing filter is translation-equivariant but wrong near every patch border:
    # blended overlapping patches stay close to the whole-image result, abutting tiles do not.
    kernel = torch.ones(1, 1, 3, 3, 3) / 27

    def smooth(x):
        for _ in range(2):
            x = torch.nn.functional.conv3d(x, kernel, padding=1)
        return x

    volume = smooth_volume((32, 32, 32), seed=3) + 1.0
    whole = smooth(volume)
    inner = (..., slice(3, -3), slice(3, -3), slice(3, -3))  # away from the image border
    (blended,) = run_patched(lambda index: [smooth(volume[index])], volume, count=2, overlap=0.25)
    (tiles,) = run_patched(lambda index: [smooth(volume[index])], volume, count=2, overlap=0.0)
    blended_error = (blended - whole)[inner].abs().max()
    tiles_error = (tiles - whole)[inner].abs().max()
    assert tiles_error > 0.3
    assert blended_error < 0.1 * tiles_error


def test_patched_field_is_continuous_across_patch_borders(smooth_volume):
    # Each patch returns a different constant: tiles jump by the difference at their border, the blend
    # changes by at most the ramp's slope times that difference between neighbouring voxels.
    values = iter(range(8))
    volume = torch.zeros(1, 1, 24, 24, 24)

    def constant(index):
        return [torch.full_like(volume[index], float(next(values)))]

    (blended,) = run_patched(constant, volume, count=2, overlap=0.25)
    shared = axis_patches(24, 2, 0.25)[0][1] - axis_patches(24, 2, 0.25)[1][0]
    slope = math.pi / (2 * shared)
    for axis, difference in zip((2, 3, 4), (4.0, 2.0, 1.0)):
        assert blended.diff(dim=axis).abs().max() <= difference * slope + 1e-5


def test_patched_stage_has_no_seams(smooth_volume):
    # The real stage run in 2x2x2 patches: abutting tiles leave a jump at their border larger than any
    # step of the whole-image field; blended overlapping patches do not, and stay closer to it overall.
    whole = _tiny(stages=(StageConfig(scale=1.0, iterations=2, radius=1, patches=1),))
    blended = _tiny(stages=(StageConfig(scale=1.0, iterations=2, radius=1, patches=2),))
    tiled = _tiny(stages=blended.config.stages, patch_overlap=0.0)
    _scale_flow_heads(whole, 0.05)
    blended.load_state_dict(whole.state_dict())
    tiled.load_state_dict(whole.state_dict())
    fixed, moving = smooth_volume((24, 24, 24), sigma=3.0, seed=1), smooth_volume((24, 24, 24), sigma=3.0, seed=2)
    with torch.no_grad():
        reference, u_blended, u_tiled = (model(fixed, moving).field for model in (whole, blended, tiled))
    (_, size), (start, _) = axis_patches(24, 2, blended.config.patch_overlap)
    band = slice(start - 1, size)  # steps between neighbours inside the blended band
    steps = [reference.diff(dim=axis).abs().max() for axis in (2, 3, 4)]
    for axis, step in zip((2, 3, 4), steps):
        assert u_blended.diff(dim=axis).abs()[(slice(None),) * axis + (band,)].max() <= step
    assert max(u_tiled.diff(dim=axis).abs().select(axis, 11).max() - step for axis, step in zip((2, 3, 4), steps)) > 0
    assert (u_blended - reference).abs().mean() < 0.8 * (u_tiled - reference).abs().mean()
