"""Carry a long study's finished runs from one machine to the next through git.

A budget ladder takes longer than a session, and a session's machine (with the study
directory under ``studies/``) can be gone by the next one. ``save`` copies every *finished*
run (summary status ``completed`` or ``diverged``: the statuses ``normlab study`` never runs
again) of ``studies/findings/NAME/`` into ``docs/findings/progress/NAME/``, with the study's
``study.yaml`` (the decisions it settled once: resolved runtime, flips, seeds), without its
checkpoints (``*.pt``): config, metrics, summary, per-image predictions and probe records are
what the report reads, and a small text record that git can keep. ``restore`` copies them back
into ``studies/findings/NAME/`` on a fresh machine, so ``normlab study`` counts them as
finished and trains only the rest. Runs that are unfinished or failed are never saved; a
finished run already present in the study directory is never overwritten by ``restore``.
The record holds per-image prediction arrays: commit it while the study runs, and take it out
of the tree once the study's report is committed (a commit that has it can bring it back).

    python docs/findings/progress.py save ladders/batch-size ladders/train-mode
    python docs/findings/progress.py restore ladders/batch-size

Run from the repository root. Prints one line per study: how many runs were copied.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

FINAL = ("completed", "diverged")  # normlab.study.runner.FINAL
STUDY_FILE = "study.yaml"  # normlab.study.runner.STUDY_FILE
SKIP_SUFFIXES = (".pt", ".tmp", ".lock")  # checkpoints, rank buffers; half-written files; locks


def _finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text(encoding="utf-8")).get("status") in FINAL
    except (OSError, ValueError):
        return False


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json") if _finished(p.parent))


def _copy_run(src: Path, dest: Path) -> None:
    """Copy ``src`` (no checkpoints) to ``dest`` through a sibling temporary directory, so
    ``dest`` is either absent or complete even if this is stopped halfway."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(src.rglob("*")):
        if f.is_file() and not f.name.endswith(SKIP_SUFFIXES):
            target = tmp / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def _dirs(name: str, root: Path) -> tuple[Path, Path]:
    return root / "studies" / "findings" / name, root / "docs" / "findings" / "progress" / name


def _copy_study_file(src: Path, dest: Path) -> None:
    if (src / STUDY_FILE).is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / (STUDY_FILE + ".tmp")
        shutil.copy2(src / STUDY_FILE, tmp)
        tmp.replace(dest / STUDY_FILE)


def save(name: str, root: Path = Path(".")) -> int:
    """Copy the finished runs of study NAME (and its study.yaml) into its progress record;
    returns how many runs."""
    study, store = _dirs(name, root)
    _copy_study_file(study, store)
    copied = 0
    for run in _run_dirs(study):
        dest = store / run.relative_to(study)
        if (
            _finished(dest)
            and (dest / "summary.json").read_bytes() == (run / "summary.json").read_bytes()
        ):
            continue
        _copy_run(run, dest)
        copied += 1
    return copied


def restore(name: str, root: Path = Path(".")) -> int:
    """Copy the recorded finished runs of NAME into its study directory (and the recorded
    study.yaml, where the directory has none); returns how many runs."""
    study, store = _dirs(name, root)
    if not (study / STUDY_FILE).is_file():
        _copy_study_file(store, study)
    copied = 0
    for run in _run_dirs(store):
        dest = study / run.relative_to(store)
        if not _finished(dest):  # absent, or an interrupted run: the finished record wins
            _copy_run(run, dest)
            copied += 1
    return copied


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("save", "restore"):
        print(__doc__.strip().splitlines()[-3], file=sys.stderr)
        print("usage: progress.py save|restore NAME [NAME ...]", file=sys.stderr)
        return 2
    action = save if argv[0] == "save" else restore
    for name in argv[1:]:
        print(f"{argv[0]} {name}: {action(name)} finished runs copied")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
