"""The per-layer sensitivity scan (``lit_prune.search.sensitivity``): a planted sensitive layer is flagged and the
others are not; a resumed scan skips the layers already in its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def _cli_args(tmp_path: Path, out: str) -> list[str]:
    weights = tmp_path / "vgg11.pth"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(create_model("cifar_vgg11").state_dict(), weights)  # --arch builds the default widths
    return ["--arch", "cifar_vgg11", "--weights", str(weights), "--data-config", "configs/quickstart.yaml",
            "--ratios", "0.5", "--max-batches", "1", "--out", str(tmp_path / out)]


def test_the_cli_writes_the_table_the_plot_and_the_method_config(tmp_path: Path, monkeypatch) -> None:
    from lit_prune.sensitivity import main
    from tests.helpers import REPO

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_cli_args(tmp_path, "one")) == 0
    table = json.loads((tmp_path / "one" / "sensitivity.json").read_text())
    assert set(table["ratios"]) == {0.5} and len(table["layers"]) == 8
    assert (tmp_path / "one" / "sensitivity.png").is_file() and (tmp_path / "one" / "method.yaml").is_file()


@pytest.mark.slow
def test_two_ranks_give_the_one_process_table_and_one_writer(tmp_path: Path, monkeypatch) -> None:
    """torchrun --nproc_per_node 2: each rank reads every 2nd image, the counts are summed, rank 0 writes."""
    import socket
    import sys

    from lit_prune.sensitivity import main
    from tests.helpers import REPO, clean_env, run_process

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_cli_args(tmp_path, "one")) == 0
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "lit_prune.sensitivity", *_cli_args(tmp_path, "two")]
    run_process(cmd, REPO, clean_env(), timeout=120)
    one, two = (json.loads((tmp_path / d / "sensitivity.json").read_text()) for d in ("one", "two"))
    assert two["baseline"] == one["baseline"] and two["layers"] == one["layers"]
