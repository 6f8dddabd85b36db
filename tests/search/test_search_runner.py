"""End to end on the offline digits: a method variant, its uniform baseline and its random control planned and run
by the protocol runner (configs/experiments/quickstart_search.yaml, one seed, one ratio, tiny stages)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lit_prune.artifact import load_artifact
from lit_prune.protocol import Protocol, load_experiment
from tests.helpers import execute_in_process
from tests.test_lottery import TINY_ARGS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_method_uniform_and_random_control_run_end_to_end(tmp_path: Path, monkeypatch) -> None:
    src = yaml.safe_load((REPO / "configs" / "experiments" / "quickstart_search.yaml").read_text())
    method = str(REPO / "configs" / "methods" / "slimming_quickstart.yaml")
    exp = {**src, "name": "search_tiny", "base": str(REPO / src["base"]), "seeds": [0], "args": TINY_ARGS,
           "large": {"args": [f"--config={method}"]},
           "variants": [{**v, "sweep": {"ratio": [0.6]}, **({"method": method} if "method" in v else {})}
                        for v in src["variants"]]}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(exp, sort_keys=False))
    monkeypatch.setattr(Protocol, "_execute", execute_in_process)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    results = Protocol(load_experiment(config), out).run()

    rows = {name: set(v["rows"]) for name, v in results["variants"].items()}
    assert rows == {"slim_ratio0.6": {"unpruned", "pruned", "finetune", "scratch_e"},
                    "uniform_ratio0.6": {"unpruned", "scratch_e"},  # fresh weights: nothing to fine-tune
                    "random_ratio0.6": {"unpruned", "pruned", "finetune"}}
    seed = out / "seed0"
    slim, uniform, rand = (load_artifact(seed / f"{v}_ratio0.6" / "prune" / "pruned.pt")
                           for v in ("slim", "uniform", "random"))
    assert rand.architecture.kwargs == slim.architecture.kwargs  # the method's widths, other channels
    assert any(not torch.equal(rand.state_dict[k], slim.state_dict[k]) for k in slim.state_dict
               if k.endswith("weight"))
    cfg = [c for c in uniform.architecture.kwargs["cfg"] if c != "M"]
    full = [16, 32, 64, 64, 128, 128, 128, 128]
    assert len({round(c / w, 1) for c, w in zip(cfg, full, strict=True)}) <= 2  # one multiplier (int rounding)
    assert abs(uniform.flops.pruned.params - slim.flops.pruned.params) < 0.02 * slim.flops.pruned.params
    assert uniform.flops.dense == slim.flops.dense
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 0
