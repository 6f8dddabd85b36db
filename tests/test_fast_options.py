"""ImageClassifier's fast options: channels_last and torch.compile (README "Fast path").

The default suite compiles with the ``aot_eager`` backend (dynamo and AOT autograd, as on a GPU, but no code
generation: seconds instead of a minute on this CPU); the ``slow`` test compiles with inductor, torch's
default backend.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lit_prune.core.groups import group_size
from lit_prune.core.surgery import prune_groups
from lit_prune.module import ImageClassifier

# a tiny VGG-11 (8 convs, a few channels): the tests check the plumbing, not the model
CFG = [4, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8]
FAST_COMPILE = {"backend": "aot_eager"}


def _module(**kw) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("cifar_vgg11", cfg=CFG, num_classes=10, lr=0.05, schedule="constant", **kw)


def _fit(module: ImageClassifier, data, tmp_path, steps: int = 3) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)  # the same batch order on both sides of a comparison
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(module, data)
    return trainer


def _convs(module: ImageClassifier) -> list[nn.Conv2d]:
    return [m for m in module.model.modules() if isinstance(m, nn.Conv2d)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_channels_last_gives_the_same_outputs_and_training(isolated, tiny_data, tmp_path):
    plain, fast = _module(), _module(channels_last=True)
    fast.model.load_state_dict(plain.model.state_dict())
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(fast))
    assert not all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(plain))
    x = tiny_data.x[:8]
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    plain.train(), fast.train()
    _fit(plain, tiny_data, tmp_path, steps=1)
    _fit(fast, tiny_data, tmp_path, steps=1)
    # Rounding differs (other conv kernels) and BN over 16 images of 1x1 pixels before the classifier amplifies it:
    # one step moves the weights by about 1e-2 and the two sides differ by about 2e-4.
    assert _max_diff(fast.model.state_dict(), plain.model.state_dict()) < 1e-3
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(fast))


def test_compiled_model_trains_to_the_eager_weights_and_checkpoints_without_orig_mod(isolated, tiny_data, tmp_path):
    eager, compiled = _module(), _module(compile=FAST_COMPILE)
    compiled.model.load_state_dict(eager.model.state_dict())
    start = {k: v.clone() for k, v in eager.model.state_dict().items()}
    _fit(eager, tiny_data, tmp_path)
    trainer = _fit(compiled, tiny_data, tmp_path)
    assert compiled._fast is not None and compiled._fast[1] is not compiled.model  # the forward was compiled
    assert _max_diff(eager.model.state_dict(), start) > 1e-3  # it trained
    assert _max_diff(compiled.model.state_dict(), eager.model.state_dict()) < 1e-5
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["state_dict"]) >= {f"model.{k}" for k in eager.model.state_dict()}
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert ckpt["hyper_parameters"]["compile"] == FAST_COMPILE
    reloaded = ImageClassifier.load_from_checkpoint(path, compile=False).eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tiny_data.x[:4]), compiled(tiny_data.x[:4]))


def test_masks_stay_enforced_under_compile(isolated, tiny_data, tmp_path):
    module = _module(compile=FAST_COMPILE, channels_last=True)
    names = [n for n, p in module.model.named_parameters() if p.dim() == 4]
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(module.model.get_parameter(n).shape, generator=gen) > 0.5 for n in names}
    module.prune_state.set_masks(masks)  # as a run from a masked artifact holds them
    before = {n: module.model.get_parameter(n).detach().clone() for n in names}
    _fit(module, tiny_data, tmp_path)
    assert module._fast is not None and module._fast[1] is not module.model
    for n in names:
        w = module.model.get_parameter(n).detach()
        assert torch.all(w[~masks[n]] == 0), n  # exactly zero, not small
        assert not torch.equal(w[masks[n]], before[n][masks[n]]), n  # the kept weights trained


def test_surgery_during_a_fit_is_noticed_and_recompiled(isolated, tiny_data):
    module = _module(compile=FAST_COMPILE, channels_last=True).eval()
    x = tiny_data.x[:4]
    with torch.no_grad():
        module(x)
    first = module._fast
    groups = module.model.channel_groups()
    prune_groups(module.model, {g.name: torch.arange(group_size(module.model, g)) < 3 for g in groups})
    assert not all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(module))
    with torch.no_grad():
        out = module(x)  # a stale graph would fail on the new shapes, or compute with the old weights
        expected = module.model(x.contiguous(memory_format=torch.channels_last))
    assert module._fast is not first and module._fast[1] is not module.model
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(module))
    assert all(c.out_channels == 3 for c in _convs(module))
    torch.testing.assert_close(out, expected)


def test_bad_compile_options_are_refused():
    with pytest.raises(ValueError, match="unknown torch.compile argument.*'modes'"):
        _module(compile={"modes": "max-autotune"})
    with pytest.raises(ValueError, match="compile must be true, false or a mapping"):
        _module(compile="max-autotune")


@pytest.mark.slow
def test_inductor_compiled_model_trains_to_the_eager_weights(isolated, tiny_data, tmp_path):
    eager, compiled = _module(), _module(compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    _fit(eager, tiny_data, tmp_path)
    _fit(compiled, tiny_data, tmp_path)
    # inductor fuses and reorders float operations: equal up to rounding, over three SGD steps
    assert _max_diff(compiled.model.state_dict(), eager.model.state_dict()) < 1e-4
