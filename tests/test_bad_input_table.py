"""Bad input to every entry point, one row each: a clear message that names the problem, exit status 2, no
traceback, and no file left behind.

The command-line tools run in-process (their ``main``), so a row costs milliseconds, except the
``train.py`` rows that reach Lightning's argument parser. The Python API rows expect the exception a caller
catches. The cases that need their own set-up (NaN weights, another model's checkpoint, resume after a kill,
a malicious pickle, a second runner) have their own tests (tests/test_bad_input.py, tests/test_resume_cli.py,
tests/datamodules, tests/protocol/test_lock.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lit_prune.cli import flops, prune
from lit_prune.cli.train import run as train
from lit_prune.models import create_model
from lit_prune.protocol.cli import main as rethink
from tests.helpers import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
L1 = str(REPO / "configs" / "methods" / "l1_quickstart.yaml")
EXPERIMENT = (REPO / "configs" / "experiments" / "quickstart.yaml").read_text()


class _Code:  # a class: pickling it stores a reference to code, which weights_only loading refuses
    pass


@pytest.fixture()
def bad(tmp_path: Path) -> dict[str, str]:
    """The bad inputs, as files in ``tmp_path``."""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_text("not a torch file\n")
    torch.save({"state_dict": {"w": _Code()}}, tmp_path / "code.pt")
    torch.save(create_model("cifar_resnet20").state_dict(), tmp_path / "r20.pth")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    torch.save(create_model("cifar_vgg16", cfg="A").state_dict(), tmp_path / "vgg16a.pth")
    base = EXPERIMENT.replace("configs/", f"{REPO}/configs/")
    (tmp_path / "exp_ok.yaml").write_text(base)
    (tmp_path / "exp_typo.yaml").write_text(base + "large: {checkpiont: x.ckpt}\n")
    (tmp_path / "exp_seeds.yaml").write_text(base.replace("seeds: [0, 1]", "seeds: []"))
    (tmp_path / "exp_args.yaml").write_text(base.replace("scratch_e: {}", "scratch_e: {args: --model.lr=0.1}"))
    (tmp_path / "method_typo.yaml").write_text("class_path: lit_prune.callbacks.L1FilterPruning\n"
                                               "init_args: {prune_ratoi: 0.3}\n")
    return {p.name: str(p) for p in tmp_path.iterdir()} | {"tmp": str(tmp_path)}


def _out(d: dict[str, str], name: str = "out.pt") -> str:
    return str(Path(d["tmp"]) / name)


Case = tuple[str, Callable[[dict[str, str]], list[str]], str]

CLI_CASES: list[Case] = [
    # python -m lit_prune.flops
    ("flops", lambda d: ["cifar_resnet57"], "unknown model 'cifar_resnet57'"),
    ("flops", lambda d: ["cifar_resnet56", "--cfg", "Z"], "known: A, B"),
    ("flops", lambda d: [d["folder"]], "is a directory"),
    ("flops", lambda d: [d["empty.ckpt"]], "is empty (0 bytes)"),
    ("flops", lambda d: [d["garbage.pt"]], "not a file written by torch.save"),
    ("flops", lambda d: [d["code.pt"]], "no code is run from a data file"),
    ("flops", lambda d: ["cifar_vgg16", "--scratch-b", "160"], "--scratch-b needs a pruned artifact"),
    # python -m lit_prune.prune
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--width-config", "A", "--out", d["folder"]], "it is a directory"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--width-config", "A", "--out", d["afile"] + "/x.pt"],
     "is a file, not a folder"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--width-config", "Q", "--out", _out(d)],
     "no width config named 'Q'"),
    ("prune", lambda d: ["--checkpoint", d["tmp"] + "/none.ckpt", "--config", L1, "--out", _out(d)],
     "no checkpoint at"),
    ("prune", lambda d: ["--checkpoint", d["empty.ckpt"], "--config", L1, "--out", _out(d)], "is empty (0 bytes)"),
    ("prune", lambda d: ["--checkpoint", d["folder"], "--config", L1, "--out", _out(d)], "(a directory)"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--config", L1, "--out", _out(d)], "--arch with --weights"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--weights", d["r20.pth"], "--config", L1, "--out", _out(d)],
     "73 missing keys (features.0.weight"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--weights", d["garbage.pt"], "--config", L1, "--out", _out(d)],
     "is not a readable weights file"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--weights", d["code.pt"], "--config", L1, "--out", _out(d)],
     "no code is run from a data file"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--weights", d["vgg16a.pth"], "--config", d["tmp"] + "/none.yaml",
                         "--out", _out(d)], "no method config at"),
    ("prune", lambda d: ["--arch", "cifar_vgg16", "--weights", d["vgg16a.pth"], "--config", d["method_typo.yaml"],
                         "--out", _out(d)], "prune_ratoi"),
    # python -m lit_prune.rethink
    ("rethink", lambda d: ["--config", d["tmp"] + "/none.yaml"], "none.yaml"),
    ("rethink", lambda d: ["--config", d["exp_typo.yaml"], "--out", _out(d, "runs")], "checkpiont"),
    ("rethink", lambda d: ["--config", d["exp_seeds.yaml"], "--out", _out(d, "runs")], "seeds"),
    ("rethink", lambda d: ["--config", d["exp_args.yaml"], "--out", _out(d, "runs")], "args"),
    ("rethink", lambda d: ["--config", d["exp_ok.yaml"], "--out", d["afile"]], "cannot use --out"),
    # python train.py fit
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--model.lr", "-1"], "lr must be > 0"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--model.regime", "scratchy"], "unknown regime 'scratchy'"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--model.arch", "cifar_resnet57"], "unknown model"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--data.rot", "x"], "did you mean 'root'?"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--model.lrr", "0.1"], "did you mean '--model.lr'?"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--model.artifact", d["tmp"] + "/none.pt"],
     "no pruned artifact at"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--model.artifact", d["r20.pth"]], "not a lit-prune artifact"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--ckpt_path", "last"], "no last.ckpt of an earlier run"),
    ("train", lambda d: ["fit", "--config", QUICKSTART, "--ckpt_path", d["empty.ckpt"]], "is empty (0 bytes)"),
]

ENTRY = {"flops": flops.main, "prune": prune.main, "rethink": rethink, "train": train}


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize(("entry", "argv", "message"), CLI_CASES,
                         ids=[f"{e}-{m[:40]}" for e, _, m in CLI_CASES])
def test_bad_command_line_input_gets_a_clear_error_and_leaves_no_file(entry, argv, message, bad, capsys,
                                                                      monkeypatch) -> None:
    root = Path(bad["tmp"])
    monkeypatch.chdir(root)  # anything a tool would write by default (runs/, lightning_logs/) lands here
    before = _files(root)
    extra = ["--trainer.logger=false"] if entry == "train" and "last" not in argv(bad) else []
    try:
        code = ENTRY[entry](argv(bad) + extra)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert _files(root) == before, sorted(map(str, _files(root) - before))


API_CASES = [
    (lambda d: __import__("lit_prune.artifact", fromlist=["load_model"]).load_model(d["r20.pth"]),
     ValueError, "not a lit-prune artifact"),
    (lambda d: __import__("lit_prune.artifact", fromlist=["load_model"]).load_model(d["tmp"] + "/none.pt"),
     FileNotFoundError, "no pruned artifact at"),
    (lambda d: __import__("lit_prune.callbacks", fromlist=["x"]).L1FilterPruning(prune_ratio=1.5),
     ValueError, "prune_ratio"),
    (lambda d: __import__("lit_prune.callbacks", fromlist=["x"]).NetworkSlimming(prune_ratio=-0.1),
     ValueError, "prune_ratio"),
    (lambda d: __import__("lit_prune.module", fromlist=["x"]).ImageClassifier(arch="cifar_vgg11", schedule="cosine2"),
     ValueError, "cosine2"),
    (lambda d: __import__("lit_prune.io", fromlist=["x"]).atomic_save_json({}, d["folder"]),
     ValueError, "it is a directory"),
    (lambda d: json.dumps(__import__("lit_prune.sources", fromlist=["x"]).load_source(d["garbage.pt"], None, None,
                                                                                      None)),
     ValueError, "not a readable checkpoint"),
]


@pytest.mark.parametrize(("call", "error", "message"), API_CASES, ids=[m for _, _, m in API_CASES])
def test_bad_python_api_input_raises_a_clear_error(call, error, message, bad) -> None:
    with pytest.raises(error, match=None) as info:
        call(bad)
    assert message in str(info.value)
