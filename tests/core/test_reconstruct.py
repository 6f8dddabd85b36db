"""Reconstruction statistics, ThiNet's greedy selection, the LASSO search and the least-squares refits."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.reconstruct import (
    ConsumerView,
    GramStats,
    apply_reconstruction,
    channel_pruning_group,
    collect_regression_stats,
    collect_thinet_stats,
    extract_patches,
    lasso,
    lasso_select,
    least_squares_weight,
    regression_lasso_problem,
    sample_positions,
    thinet_greedy,
    thinet_group,
)
from lit_prune.models import create_model
from tests.helpers import randomize_bn

CFG = [8, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8]
GROUP = "features.4"  # conv 8 -> 8 with BN features.5, read by the 3x3 conv features.8 after a pool


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("cifar_vgg11", cfg=CFG).eval()


def _group(model: nn.Module, name: str = GROUP):
    return next(g for g in channel_groups(model) if g.name == name)


def _images(n: int, seed: int, batch: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, 32, 32, generator=g).split(batch))


def _consumer_input(model: nn.Module, path: str, images: list[torch.Tensor]) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for x in images:
            model(x)
    handle.remove()
    return torch.cat(seen)


# ---- sampling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2, "padding": 1},
                                    {"kernel_size": 3, "dilation": 2, "padding": 2}, {"kernel_size": 1}],
                         ids=["3x3", "stride2", "dilated", "1x1"])
def test_patches_times_weight_give_the_conv_output(kwargs) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, bias=False, **kwargs)
    x = torch.randn(3, 5, 9, 9)
    index = sample_positions(conv, x, 6, torch.Generator().manual_seed(0))
    patches = extract_patches(conv, x, index, 5)  # (m, C, k)
    assert patches.shape == (18, 5, conv.weight[0, 0].numel())
    y = torch.einsum("mck,nck->mn", patches, conv.weight.detach().reshape(7, 5, -1))
    out = conv(x).detach()
    torch.testing.assert_close(y, out[index[0], :, index[1], index[2]], rtol=1e-5, atol=1e-5)


def test_linear_consumer_reads_r_columns_per_channel() -> None:
    lin = nn.Linear(4 * 3, 2, bias=False)
    x = torch.randn(5, 12)
    index = sample_positions(lin, x, 10)
    patches = extract_patches(lin, x, index, 4)
    assert patches.shape == (5, 4, 3)
    torch.testing.assert_close(torch.einsum("mck,nck->mn", patches, lin.weight.detach().reshape(2, 4, 3)),
                               lin(x).detach())


def test_positions_are_seeded_distinct_and_cover_small_maps() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    x = torch.zeros(4, 2, 6, 6)
    a = sample_positions(conv, x, 10, torch.Generator().manual_seed(3))
    b = sample_positions(conv, x, 10, torch.Generator().manual_seed(3))
    c = sample_positions(conv, x, 10, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    flat = (a[0] * 36 + a[1] * 6 + a[2]).tolist()
    assert len(set(flat)) == 40  # 10 distinct positions in each of the 4 images
    small = sample_positions(conv, torch.zeros(2, 2, 3, 3), 10)
    assert small[0].numel() == 18  # a 3x3 map has only 9 positions: all of them


# ---- statistics: what the DDP all-reduce relies on -------------------------------------------------------


def test_gram_stats_of_two_halves_sum_to_the_whole() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randn(50, 3, generator=g)
    whole, first, second = GramStats.zeros(6, 3), GramStats.zeros(6, 3), GramStats.zeros(6, 3)
    whole.update(x, y)
    first.update(x[:20], y[:20])
    second.update(x[20:], y[20:])
    total = first + second
    for name in ("gram", "cross", "sq", "count"):
        torch.testing.assert_close(getattr(total, name), getattr(whole, name))
    torch.testing.assert_close(whole.gram, (x.double().T @ x.double()))
    assert whole.gram.dtype == torch.float64 and whole.samples == 50


def _fake_all_reduce(other):
    """A reduce_fn adding the other "rank's" accumulators, in the order GramStats.reduce visits them."""
    tensors = iter([other.gram, other.cross, other.sq, other.count])
    return lambda t: t + next(tensors)


@pytest.mark.parametrize("collect", [collect_regression_stats, collect_thinet_stats], ids=["regression", "thinet"])
def test_collected_statistics_of_two_shards_all_reduce_to_the_whole(collect) -> None:
    model, images = _model(), _images(32, seed=1)
    group = _group(model, "features.18")  # consumer features.22 sees a 2x2 map: every position is sampled
    kw = {"positions_per_image": 10}
    if collect is collect_thinet_stats:
        # each sample's random output channel comes from the generator: the split run continues one stream
        whole = collect(model, group, images, generator=torch.Generator().manual_seed(0), **kw)
        gen = torch.Generator().manual_seed(0)
        first = collect(model, group, images[:1], generator=gen, **kw)
        second = collect(model, group, images[1:], generator=gen, **kw)
    else:
        whole = collect(model, group, images, **kw)
        first = collect(model, group, images[:1], **kw)
        second = collect(model, group, images[1:], **kw)
    reduced = first.reduce(_fake_all_reduce(second))
    assert reduced.samples == whole.samples == 32 * 4
    for name in ("gram", "cross", "sq"):
        torch.testing.assert_close(getattr(reduced, name), getattr(whole, name))


def test_statistics_memory_does_not_grow_with_samples() -> None:
    model = _model()
    group = _group(model)
    few = collect_regression_stats(model, group, _images(4, 0), generator=torch.Generator().manual_seed(0))
    many = collect_regression_stats(model, group, _images(64, 0), generator=torch.Generator().manual_seed(0))
    assert many.samples == 16 * few.samples
    assert many.gram.shape == few.gram.shape == (8 * 9, 8 * 9) and many.cross.shape == (72, 8)


def test_lasso_quadratic_form_equals_explicit_contributions() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 4, 3, dtype=torch.float64)  # (n, C, k)
    patches = torch.randn(30, 4, 3, dtype=torch.float64)
    y = torch.randn(30, 5, dtype=torch.float64)
    stats = GramStats.zeros(12, 5)
    stats.update(patches.flatten(1), y)
    q_mat, q_vec = regression_lasso_problem(stats, w)
    z = torch.einsum("mck,nck->mnc", patches, w).reshape(-1, 4)  # column i: channel i's contribution, flattened
    rows = z.shape[0]
    torch.testing.assert_close(q_mat, z.T @ z / rows)
    torch.testing.assert_close(q_vec, z.T @ y.reshape(-1) / rows)


# ---- ThiNet ------------------------------------------------------------------------------------------------


def test_greedy_on_the_gram_matrix_equals_greedy_on_the_samples() -> None:
    g = torch.Generator().manual_seed(0)
    xhat = torch.randn(200, 7, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, 7, dtype=torch.float64)
    keep = thinet_greedy(xhat.T @ xhat, 3)
    # docs/paper-settings.md §4.2 step 2, literally: the removed set grows by the channel minimising the samples' error
    removed: list[int] = []
    while len(removed) < 4:
        cost = {j: float(xhat[:, removed + [j]].sum(1).square().sum()) for j in range(7) if j not in removed}
        removed.append(min(cost, key=cost.get))
    assert sorted((~keep).nonzero().flatten().tolist()) == sorted(removed)


def test_greedy_removes_the_weakest_contribution_first() -> None:
    g = torch.Generator().manual_seed(1)
    xhat = torch.randn(100, 5, generator=g, dtype=torch.float64)
    xhat[:, 3] = 0.01 * torch.randn(100, generator=g)  # nearly nothing: removed first
    keep = thinet_greedy(xhat.T @ xhat, 4)
    assert keep.tolist() == [True, True, True, False, True]


def _plant_dead_channel(model: nn.Module, j: int) -> None:
    """Channel j of GROUP outputs 0 after its BN and ReLU: it contributes nothing to the consumer."""
    with torch.no_grad():
        model.features[4].weight[j] = 0
        if model.features[4].bias is not None:
            model.features[4].bias[j] = 0
        model.features[5].running_mean[j] = 0
        model.features[5].bias[j] = -1.0


@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_planted_dead_channel_is_removed(method) -> None:
    model = _model()
    _plant_dead_channel(model, 5)
    group, images = _group(model), _images(32, 2)
    if method == "thinet":
        rec = thinet_group(model, group, images, 7, generator=torch.Generator().manual_seed(0))
    else:
        rec = channel_pruning_group(model, group, images, 7, generator=torch.Generator().manual_seed(0))
    assert (~rec.keep).nonzero().flatten().tolist() == [5]
    assert rec.error_removed < 1e-10  # a channel that contributes nothing costs nothing


def test_lasso_removes_one_of_a_proportional_pair_and_the_refit_absorbs_it() -> None:
    model = _model()
    a, b = 2, 6
    with torch.no_grad():  # channel b duplicates channel a's activation, and the consumer reads it twice as strongly
        for m in (model.features[4], model.features[5]):
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if t is not None:
                    t[b] = t[a]
        model.features[8].weight[:, b] = 2 * model.features[8].weight[:, a]
    rec = channel_pruning_group(model, _group(model), _images(32, 3), 7, generator=torch.Generator().manual_seed(0))
    removed = (~rec.keep).nonzero().flatten().tolist()
    assert removed == [a]  # Z_b = 2 Z_a: the L1 penalty prefers the stronger column
    assert rec.error_removed > 1e-3 and rec.error_reconstructed < 1e-6  # W'_b = W_b + W_a reconstructs exactly


# ---- LASSO ---------------------------------------------------------------------------------------------------


def _random_problem(c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(400, c, generator=g, dtype=torch.float64) * torch.rand(c, generator=g, dtype=torch.float64)
    y = z @ torch.randn(c, generator=g, dtype=torch.float64) + 0.1 * torch.randn(400, generator=g, dtype=torch.float64)
    return z.T @ z / 400, z.T @ y / 400


def test_coordinate_descent_meets_the_lasso_optimality_conditions() -> None:
    q_mat, q_vec = _random_problem(12, 0)
    alpha = 0.05
    beta = lasso(q_mat.numpy(), q_vec.numpy(), alpha, tol=1e-12)
    # subgradient conditions: |grad_j| <= alpha where b_j = 0, grad_j = alpha sign(b_j) elsewhere
    grad = q_vec.numpy() - q_mat.numpy() @ beta
    nz = beta != 0
    assert 0 < nz.sum() < 12
    assert abs(grad[~nz]).max() <= alpha + 1e-9
    assert abs(grad[nz] - alpha * (beta[nz] > 0) + alpha * (beta[nz] < 0)).max() < 1e-8


@pytest.mark.parametrize("num_keep", [1, 5, 10, 16, 23])
def test_binary_search_keeps_exactly_c_prime_channels(num_keep) -> None:
    q_mat, q_vec = _random_problem(24, 1)
    keep, info = lasso_select(q_mat, q_vec, num_keep)
    assert keep.dtype == torch.bool and int(keep.sum()) == num_keep
    # the search stopped inside He et al.'s window [c', c' (1 + 0.1)] of non-zero coefficients
    assert num_keep <= info["nonzero"] <= num_keep * 1.1
    beta = lasso(q_mat.numpy(), q_vec.numpy(), info["alpha"])
    assert set(torch.as_tensor(beta).nonzero().flatten().tolist()) >= set(keep.nonzero().flatten().tolist())


def test_binary_search_brackets_alpha_from_above_by_halving() -> None:
    q_mat, q_vec = _random_problem(24, 2)
    _, info = lasso_select(q_mat, q_vec, 2)
    # every coefficient is zero at alpha_max = max |q|; halving gives the bracket alpha_max 2^-(i+1) .. 2^-i
    fraction = info["alpha_fraction"]
    assert info["alpha"] == pytest.approx(fraction * float(q_vec.abs().max()))
    i = next(i for i in itertools.count(1) if 2.0 ** -i <= fraction)
    assert 2.0 ** -i <= fraction <= 2.0 ** -(i - 1)
    assert not lasso(q_mat.numpy(), q_vec.numpy(), float(q_vec.abs().max())).any()


def test_binary_search_is_skipped_when_no_more_channels_contribute_than_are_kept() -> None:
    # dead channels (no contribution, Q_jj = 0) can never be non-zero: searching for more non-zeros than the
    # contributing channels would spend every step on the slowest, near-least-squares solves
    q_mat, q_vec = _random_problem(12, 4)
    dead = torch.tensor([1, 4, 7, 10])
    q_mat[dead, :], q_mat[:, dead], q_vec[dead] = 0, 0, 0
    for num_keep in (8, 9):
        keep, info = lasso_select(q_mat, q_vec, num_keep)
        assert info["steps"] == 0 and info["nonzero"] == 8
        assert int(keep.sum()) == num_keep and not keep[[0, 2, 3, 5, 6, 8, 9, 11]].logical_not().any()
    keep, info = lasso_select(q_mat, q_vec, 12)
    assert keep.all() and info["nonzero"] == 8


@pytest.mark.parametrize("scale", [1e-20, 1e30])
def test_binary_search_does_not_depend_on_the_scale_of_the_activations(scale) -> None:
    # an absolute starting alpha once made the search double ~150 times on a diverged network (activations ~1e25)
    q_mat, q_vec = _random_problem(24, 3)
    keep, info = lasso_select(q_mat, q_vec, 6)
    keep_s, info_s = lasso_select(q_mat * scale, q_vec * scale, 6)
    assert torch.equal(keep, keep_s)
    assert info_s["steps"] == info["steps"] < 20
    assert info_s["alpha_fraction"] == pytest.approx(info["alpha_fraction"])


# ---- least squares -------------------------------------------------------------------------------------------


def test_least_squares_from_statistics_equals_lstsq_on_samples() -> None:
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(300, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(300, 5, generator=g, dtype=torch.float64)
    stats = GramStats.zeros(12, 5)
    stats.update(patches.flatten(1), y)
    keep = torch.tensor([True, False, True, True])
    w = least_squares_weight(stats, torch.randn(5, 4, 3, dtype=torch.float64), keep, ridge=0.0)
    expected = torch.linalg.lstsq(patches[:, keep].flatten(1), y).solution.T.reshape(5, 3, 3)
    torch.testing.assert_close(w[:, keep], expected)
    assert not w[:, ~keep].any()


def _output_error(model: nn.Module, consumer: str, weight: torch.Tensor, images: list[torch.Tensor]) -> float:
    conv = model.get_submodule(consumer)
    x = _consumer_input(model, consumer, images)
    full = F.conv2d(x, conv.weight.detach(), None, conv.stride, conv.padding)
    return float((F.conv2d(x, weight, None, conv.stride, conv.padding) - full).square().sum())


@pytest.mark.parametrize("method", ["thinet", "channel_pruning"])
def test_refit_lowers_the_held_out_output_error_of_plain_removal(method) -> None:
    model, train, held_out = _model(), _images(64, 4), _images(32, 5)
    group = _group(model)
    fn = thinet_group if method == "thinet" else channel_pruning_group
    rec = fn(model, group, train, 4, generator=torch.Generator().manual_seed(0))
    consumer = group.consumers[0]
    w = model.get_submodule(consumer).weight.detach()
    plain = w * rec.keep.reshape(1, -1, 1, 1)
    e_plain = _output_error(model, consumer, plain, held_out)
    e_refit = _output_error(model, consumer, rec.weight, held_out)
    assert not rec.weight[:, ~rec.keep].any()
    assert e_refit < e_plain
    assert rec.error_reconstructed < rec.error_removed  # the same on the samples' statistics


def test_apply_reconstruction_prunes_physically_and_keeps_the_function() -> None:
    model, images = _model(), _images(32, 6)
    group = _group(model)
    rec = channel_pruning_group(model, group, images, 3, generator=torch.Generator().manual_seed(0))
    masked = _model()
    with torch.no_grad():  # the full-width model with the refitted weight computes what the narrow one does
        masked.get_submodule(group.consumers[0]).weight.copy_(rec.weight)
    apply_reconstruction(model, group, rec)
    assert group_size(model, group) == 3 and model.features[8].in_channels == 3
    torch.testing.assert_close(model.features[8].weight, rec.weight[:, rec.keep])
    x = images[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- ResNets: the shortcut-compensated target


_FAMILIES = [  # (model, kwargs, image side, final activation of a block)
    ("cifar_resnet20", {"gates": True}, 32, F.relu),
    ("bearpaw_resnet50", {"gates": True}, 32, F.relu),
    ("resnet34", {"gates": True}, 64, F.relu),
    ("resnet50", {"gates": True}, 64, F.relu),
    ("slim_preresnet164", {}, 32, lambda t: t),
    ("sss_resnet50", {"gates": True}, 64, lambda t: t),
]


@pytest.mark.parametrize("name,kwargs,side,act", _FAMILIES, ids=[f[0] for f in _FAMILIES])
def test_residual_blocks_describe_their_branch_end_and_shortcut(name, kwargs, side, act) -> None:
    # out = act(shortcut_output(x) + a * z + b) for ANY end-conv output z: force z = delta and compare
    model = create_model(name, **kwargs).eval()
    randomize_bn(model)
    block = model.get_submodule("layer2.0")  # a stage's first block: a projection or pooling shortcut
    gate = 0.7 if getattr(block, "gate", None) is not None else 1.0
    if gate != 1.0:
        block.gate.weight.data.fill_(gate)
    x = _consumer_input(model, "layer2.0", [torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        delta = torch.randn_like(block.shortcut_output(x)) * 3  # (N, C_out, H', W')
        handle = getattr(block, block.branch_end).register_forward_hook(lambda _m, _i, _o: delta)
        out = block(x)
        handle.remove()
        a, b = block.branch_affine()
        expected = act(block.shortcut_output(x) + a[:, None, None] * delta + b[:, None, None])
        bn = getattr(block, block.branch_end_bn) if block.branch_end_bn else None
    if bn is not None:
        assert not torch.allclose(a, torch.ones_like(a))  # randomised BN: a scale that matters
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _block_output_error(model: nn.Module, original: nn.Module, block: str, images: list[torch.Tensor]) -> float:
    """||out - out_original||^2 / ||out_original||^2 of a block's output over ``images``."""
    seen: dict[str, list[torch.Tensor]] = {"m": [], "o": []}
    hooks = [model.get_submodule(block).register_forward_hook(lambda _m, _i, o: seen["m"].append(o)),
             original.get_submodule(block).register_forward_hook(lambda _m, _i, o: seen["o"].append(o))]
    with torch.no_grad():
        for x in images:
            model(x), original(x)
    for h in hooks:
        h.remove()
    out, ref = torch.cat(seen["m"]), torch.cat(seen["o"])
    return float((out - ref).square().sum() / ref.square().sum())


@pytest.mark.parametrize("name", ["bearpaw_resnet50", pytest.param("slim_preresnet164", marks=pytest.mark.slow)])
def test_shortcut_compensation_lowers_the_error_of_the_block_output(name) -> None:
    # docs/paper-settings.md §5.2 step 5: earlier layers leave an error on the residual stream (here: a perturbed stem);
    # reconstructing a branch's last conv against Y1 + Y2 - Y2' makes the branch correct it, so the block's
    # output is closer to the original's than with the original branch output Y1 as the target.
    torch.manual_seed(0)
    original = create_model(name).eval()
    randomize_bn(original)
    current = copy.deepcopy(original)
    with torch.no_grad():
        current.conv1.weight.mul_(1 + torch.randn_like(current.conv1.weight))
    end = "layer2.0." + current.layer2[0].branch_end  # the stage's first block: its shortcut is a projection
    group = next(g for g in channel_groups(current) if g.consumers == (end,))
    train, held_out = _images(32, 7), _images(16, 8)
    errors = {}
    for compensate in (False, True):
        net = copy.deepcopy(current)
        rec = channel_pruning_group(net, group, train, group_size(net, group) // 2, original=original,
                                    positions_per_image=64, generator=torch.Generator().manual_seed(0),
                                    compensate_shortcut=compensate)
        apply_reconstruction(net, group, rec)
        errors[compensate] = _block_output_error(net, original, "layer2.0", held_out)
    assert errors[True] < 0.92 * errors[False]  # measured: 0.144 vs 0.172 (bearpaw), 0.063 vs 0.070


def test_compensation_uses_the_current_branch_scale_after_its_bn_moved() -> None:
    # fine-tuning between layers may change the end BN of the current network (here: gamma doubled); the refit
    # of the end conv must then aim at the original block output through the *current* BN (scale and shift)
    torch.manual_seed(0)
    original = create_model("bearpaw_resnet50").eval()
    randomize_bn(original)
    current = copy.deepcopy(original)
    end = "layer2.0." + current.layer2[0].branch_end
    with torch.no_grad():
        current.get_submodule("layer2.0." + current.layer2[0].branch_end_bn).weight.mul_(2)
    group = next(g for g in channel_groups(current) if g.consumers == (end,))
    rec = channel_pruning_group(current, group, _images(16, 9), group_size(current, group), original=original,
                                positions_per_image=64, generator=torch.Generator().manual_seed(0),
                                compensate_shortcut=True)
    apply_reconstruction(current, group, rec)
    assert _block_output_error(current, original, "layer2.0", _images(16, 10)) < 1e-3  # 0.41 with a stale scale


def test_consumer_view_knows_the_residual_block_a_consumer_ends() -> None:
    model = create_model("cifar_resnet20").eval()
    groups = {g.name: g for g in channel_groups(model)}
    group = groups["layer2.0.conv1"]
    view = ConsumerView.of(model, group)  # read by conv2, the branch end
    assert (view.path, view.channels, view.block_path) == ("layer2.0.conv2", group_size(model, group), "layer2.0")
    assert view.ends_branch and view.block is model.layer2[0] and view.module is model.layer2[0].conv2
    assert view.weight3().shape == (32, view.channels, 9)
    a, b = view.branch_affine()
    assert a.dtype == torch.float64 and a.shape == b.shape == (32,)
    plain = ConsumerView.of(_model(), _group(_model()))  # a VGG conv ends no branch
    assert not plain.ends_branch and plain.block is None
    with pytest.raises(ValueError, match="does not end a residual branch"):
        plain.branch_affine()
