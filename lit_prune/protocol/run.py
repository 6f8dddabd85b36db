"""Execution: the stages one after the other, each its own process, skipping those already done.

An experiment directory belongs to one config: ``experiment.json`` keeps its hash, and another config is
refused rather than mixed in. A directory written before the hash covered the files named in ``args``
(``hash_version`` 1) is recognised by its old hash and re-tied to the new one when nothing the old hash
left out is at stake; otherwise the message says what to do.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from lit_prune.protocol.config import HASH_VERSION, ExperimentConfig, ExperimentError
from lit_prune.protocol.layout import ARTIFACT, RunLayout, read_metrics
from lit_prune.protocol.plan import Planner, ScratchB, Stage


def _save_json(obj: Any, path: Path) -> None:
    from lit_prune.io import atomic_save_json

    atomic_save_json(obj, path)


class Protocol:
    """Plans and runs the stages of one experiment in ``out``."""

    def __init__(self, config: ExperimentConfig, out: str | Path, python: str = sys.executable) -> None:
        self.config = config
        self.layout = RunLayout(out)
        self.out = self.layout.root
        self.planner = Planner(config, self.layout, python)
        self.hash = config.hash

    @property
    def epochs(self) -> int:
        """The large model's epochs (what Scratch-E repeats and Scratch-B stretches)."""
        return self.planner.epochs

    def plan(self) -> list[Stage]:
        return self.planner.stages()

    def scratch_b(self, st: Stage) -> ScratchB:
        return self.planner.scratch_b(st)

    # -- the directory
    def prepare(self) -> None:
        """Tie the directory to this config, refusing one made by another config."""
        self.out.mkdir(parents=True, exist_ok=True)
        marker = self.layout.marker
        if not marker.is_file():
            self._write_marker()
            return
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise ExperimentError(f"{marker} is not an experiment record (it does not read back as JSON); use "
                                  "another --out, or delete that directory to start over")
        if old.get("hash") == self.hash:
            return
        if "hash_version" not in old and old.get("hash") == self.config.legacy_hash:
            self._adopt_legacy_marker(old)
            return
        changed = ""
        if isinstance(old.get("files"), dict):
            files = self.config.file_digests()
            diff = sorted(f for f in {*files, *old["files"]} if files.get(f) != old["files"].get(f))
            changed = f"; files that differ: {', '.join(diff)}" if diff else ""
        elif "hash_version" not in old:
            changed = " (written by an older lit-prune, whose hash did not cover the files named in args)"
        raise ExperimentError(
            f"{self.out} holds results of another config (hash {old.get('hash')}, this one {self.hash}, "
            f"experiment {old.get('name')!r}){changed}; use another --out, or delete that directory to start over")

    def _write_marker(self) -> None:
        _save_json({"name": self.config.name, "hash": self.hash, "hash_version": HASH_VERSION,
                    "files": self.config.file_digests(), "config": self.config.to_dict()}, self.layout.marker)

    def _adopt_legacy_marker(self, old: dict[str, Any]) -> None:
        """A directory this config made under the old hash (which left out the files named in args)."""
        unchecked = self.config.arg_files
        if unchecked:
            raise ExperimentError(
                f"{self.out} was made by this config under an older lit-prune, whose hash (hash {old['hash']}) did "
                f"not cover the files named in args ({', '.join(unchecked)}), so it cannot tell whether they changed "
                f"since. If they did not, set \"hash\" in {self.layout.marker} to {self.hash} and run again; "
                "otherwise use another --out, or delete that directory to start over")
        print(f"{self.layout.marker}: written under the older config hash {old['hash']}, which this config matches; "
              f"now tied to hash {self.hash}", flush=True)
        self._write_marker()

    # -- running
    def run(self, *, dry_run: bool = False, verbose: bool = False) -> dict[str, Any]:
        stages = self.plan()
        if not dry_run:
            self.prepare()
        t_start = time.time()
        for i, st in enumerate(stages, 1):
            head = f"[{i}/{len(stages)}] {st.label}"
            if self.planner.needs_budget(st):
                if dry_run and not self.planner.budget_known(st):
                    st = replace(st, note=self.planner.pending_note())
                else:
                    st = self.scratch_b(st).applied_to(st)
            if dry_run:
                epochs = f" ({st.epochs} epochs)" if st.epochs is not None else ""
                print(f"{head}{epochs}{' - ' + st.note if st.note else ''}")
                if st.command:
                    print("    " + shlex.join(st.command))
                continue
            if st.done():
                print(f"{head}: done, skipped")
                continue
            if st.kind == "prune" and not st.command:
                self._adopt_training_artifact(st)
                print(f"{head}: {st.note}")
                continue
            if st.kind != "prune":
                self._write_stage_yaml(st)
            epochs = f", {st.epochs} epochs" if st.epochs else ""
            print(f"{head}{epochs}{' (' + st.note + ')' if st.note else ''} ...", flush=True)
            t0 = time.time()
            self._execute(st, verbose)
            m = read_metrics(st.dir)
            acc = f", test acc1 {100 * m['acc1']:.2f}%" if m else ""
            print(f"    done in {time.time() - t0:.1f} s{acc}", flush=True)
        if dry_run:
            return {}
        from lit_prune.protocol.report import collect, write_results

        results = collect(self.config, self.layout)
        write_results(self.config, self.layout, results)
        print(f"\nall stages finished in {time.time() - t_start:.1f} s\n")
        print(self.layout.results_md.read_text())
        print(f"results: {self.layout.results_md}, {self.layout.results_json}, {self.layout.results_png}")
        print(f"TensorBoard: tensorboard --logdir {self.layout.tb}")
        return results

    def _write_stage_yaml(self, st: Stage) -> None:
        st.dir.mkdir(parents=True, exist_ok=True)
        self.layout.stage_yaml(st.dir).write_text(yaml.safe_dump(self.planner.stage_yaml(st)))

    def _adopt_training_artifact(self, st: Stage) -> None:
        from lit_prune.artifact import load_artifact

        assert st.variant is not None, st
        artifact = self.config.variant(st.variant).from_training
        assert artifact is not None, st
        places = self.layout.training_artifact_places(st.seed)
        found = [p for place in places for p in sorted(place.rglob(artifact))]
        if not found:
            raise ExperimentError(f"the large run of seed {st.seed} wrote no {artifact} (looked in "
                                  f"{places[0]} and {places[1]}); does the base config (or large.args) attach the "
                                  "method's callback?")
        st.dir.mkdir(parents=True, exist_ok=True)
        load_artifact(found[0])  # validate before adopting
        shutil.copyfile(found[0], st.dir / ARTIFACT)

    def _execute(self, st: Stage, verbose: bool) -> None:
        st.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.layout.stage_log(st.dir)
        with open(log_path, "ab") as log:
            proc = subprocess.run(st.command, stdout=None if verbose else log, stderr=subprocess.STDOUT if not verbose
                                  else None)
        if proc.returncode != 0:
            tail = "" if verbose else "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise ExperimentError(f"stage '{st.label}' failed (exit {proc.returncode}); log: {log_path}\n{tail}\n"
                                  f"command: {shlex.join(st.command)}")
