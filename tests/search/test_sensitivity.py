"""The per-layer sensitivity scan (``lit_prune.search.sensitivity``): a planted sensitive layer is flagged and the
others are not; a resumed scan skips the layers already in its table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lit_prune.models import create_model
from lit_prune.search.sensitivity import plot, proposal, scan

CFG = [8, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8]


def _model_and_eval():
    """A tiny VGG whose layers, but one, have half their filters dead (tiny norms): pruning half of them costs
    nothing. ``features.4`` keeps every filter alive: it is the planted sensitive layer. The labels are the
    model's own predictions (of a fixed batch), so the unpruned model scores 100%."""
    torch.manual_seed(0)
    model = create_model("cifar_vgg11", cfg=CFG, num_classes=10).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d) and name != "features.4":
                m.weight[::2] *= 1e-6
            if isinstance(m, torch.nn.Conv2d):
                m.weight *= 3
    x = torch.randn(128, 3, 32, 32)

    def predict(m):  # an untrained net's logits share a large offset: the class is where an image stands out
        with torch.no_grad():
            logits = m(x)
            return (logits - logits.mean(0)).argmax(1)

    y = predict(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        return 100.0 * float((predict(m) == y).float().mean())

    return model, evaluate, calls


def test_the_planted_sensitive_layer_is_flagged_and_the_scan_resumes(tmp_path: Path) -> None:
    model, evaluate, calls = _model_and_eval()
    path = tmp_path / "sensitivity.json"
    table = scan(model, evaluate, [0.25, 0.5], path, progress=False)
    assert table["baseline"] == 100.0
    found = proposal(table, probe=0.5, tolerance=5.0)
    assert found["sensitive"] == ["features.4"], table
    assert found["init_args"]["skip"] == ["features.4"]
    assert set(found["init_args"]["prune_ratio"]) == set(table["layers"]) - {"features.4"}
    assert len(calls) == 1 + 2 * len(table["layers"])

    # a scan stopped after two layers resumes with the third
    stopped = {**table, "layers": dict(list(table["layers"].items())[:2])}
    path.write_text(json.dumps(stopped))
    calls.clear()
    again = scan(model, evaluate, [0.25, 0.5], path, progress=False)
    assert len(calls) == 2 * (len(table["layers"]) - 2)  # no baseline, no finished layer again
    assert again["layers"] == table["layers"]
    plot(again, found["sensitive"], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
