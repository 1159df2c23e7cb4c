"""Run a study: ``run_study(spec, out) -> StudyResult``; resumable at any moment.

A study directory::

    study.yaml      the frozen spec (runtime resolved, probes decided) + ``meta`` (command,
                    git SHA, versions); itself a valid study file
    state.json      every run's status (pending | running | completed | diverged | failed),
                    failure reason, epochs done; a view of the run directories, rewritten
                    atomically as runs start and finish
    runs/[<group>/]<variant>/seed-<n>/   one run directory each, as ``normlab train`` writes
    report.html, report.md, results.csv, figures/   (normlab.report)

Resuming: running the same command again (or ``normlab study DIR``) skips runs whose summary
says completed or diverged (a divergence is a result; it would diverge again) and resumes every
other run from its last checkpoint (``fit(resume=True)``), so a study killed at any moment
(Ctrl-C, ``kill -9``, power cut) loses at most the epochs in progress and never duplicates one.
Before anything runs, every existing run directory's config is checked against the plan, so a
changed command cannot mix settings in one study (more seeds may be added, though: the saved
seeds are kept and the new ones appended). One study process at a time owns a study directory
(an exclusive lock on ``.study.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from normlab.config import config_to_dict
from normlab.engine.loggers import parse_loggers, prepare_store
from normlab.errors import ConfigError
from normlab.store import RunDir, atomic_write_text, run_meta
from normlab.store import config_differences as store_config_differences
from normlab.study.executors import (
    Executor,
    RunOutcome,
    RunTask,
    failure_reason,
    make_executor,
    stacked_task,
    twin_task,
)
from normlab.study.layout import LOCK_FILE, STATE_FILE, STUDY_FILE
from normlab.study.plan import RunSpec, StudyPlan, plan_study, saved_flips
from normlab.study.spec import StudySpec, load_spec_file, spec_to_dict
from normlab.yamlio import dumps, read_yaml_mapping

FINAL = ("completed", "diverged")  # statuses that are not run again


@dataclass
class RunState:
    """What the study knows about one run (mirrored into state.json)."""

    key: str
    group: str | None
    variant: str
    seed: int
    run_dir: str  # relative to the study directory
    epochs: int
    status: str = "pending"
    reason: str | None = None
    epochs_done: int = 0
    wall_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StudyResult:
    plan: StudyPlan
    runs: dict[str, RunState]

    def count(self, status: str) -> int:
        return sum(1 for r in self.runs.values() if r.status == status)

    @property
    def ok(self) -> bool:
        """No run failed (diverged runs are results, not failures)."""
        return all(r.status in FINAL for r in self.runs.values())


# --------------------------------------------------------------------------------------------
# resuming: the saved study decides what the machine decided


def config_differences(saved: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """``key: run has X, study gives Y`` for every setting that differs: the one check
    :func:`normlab.store.config_differences` (also behind ``train --resume``), worded for a
    study."""
    return store_config_differences(saved, planned, giver="study gives")


def _saved_decisions(
    saved: StudySpec, spec: StudySpec
) -> tuple[dict[str, str], list[str], Mapping[str, bool] | bool]:
    """The runtime fields, optional probes and flips the saved study settled, for ``spec``."""
    base_rt = (spec.base.get("runtime") or {}) if isinstance(spec.base, Mapping) else {}
    saved_rt = saved.base.get("runtime") or {}
    runtime = {
        k: str(saved_rt[k])
        for k in ("device", "precision", "memory_format")
        if base_rt.get(k, "auto") == "auto" and k in saved_rt
    }
    probes = [p for p in spec.optional_probes if p in (saved.base.get("probes") or [])]
    return runtime, probes, saved_flips(saved)


def prepare(spec: StudySpec, out: str | Path) -> StudyPlan:
    """Plan ``spec`` into ``out``, consistently with what ``out`` already holds.

    A new directory gets a fresh plan (runtime resolved here). An existing study directory
    keeps its resolved runtime, probe and flip decisions and its seeds (new seeds are appended;
    a study saved before flip decisions were recorded keeps flipping every source); each
    existing run directory must match its planned config, else ConfigError listing the
    differences.
    """
    out = Path(out)
    saved_path = out / STUDY_FILE
    if not saved_path.is_file():
        plan = plan_study(spec, out)
    else:
        saved = load_spec_file(saved_path)
        runtime, probes, flips = _saved_decisions(saved, spec)
        plan = plan_study(spec, out, runtime=runtime, probes=probes, flips=flips)
        if plan.spec.name != saved.name:
            raise ConfigError(
                f"{out} holds study '{saved.name}', not '{plan.spec.name}': choose another --out"
            )
        extra = [s for s in plan.spec.seeds if s not in saved.seeds]
        seeds = (*saved.seeds, *extra)
        if seeds != plan.spec.seeds:
            plan = plan_study(
                replace(spec, seeds=seeds), out, runtime=runtime, probes=probes, flips=flips
            )
    mismatched = []
    for run in plan.runs:
        rd = RunDir(run.run_dir)
        if not rd.exists():
            continue
        diffs = config_differences(rd.read_config_dict(), config_to_dict(run.config))
        if diffs:
            mismatched.append(f"{run.key} ({'; '.join(diffs[:3])})")
    if mismatched:
        raise ConfigError(
            f"{out} holds runs made with other settings than this command gives: "
            f"{mismatched[0]}"
            + (f" and {len(mismatched) - 1} more runs" if len(mismatched) > 1 else "")
            + "; rerun with the original settings to resume, or choose another --out"
        )
    return plan


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Exclusive ownership of a study directory by this process (released when it exits,
    however it exits)."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole study
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{out} is in use by another normlab study process; wait for it or stop it"
            ) from None
        yield
    finally:
        fh.close()


# --------------------------------------------------------------------------------------------
# state and progress


def run_state(run: RunSpec, out: Path) -> RunState:
    """The state of ``run`` as its run directory shows it."""
    state = RunState(
        key=run.key,
        group=run.group,
        variant=run.variant,
        seed=run.seed,
        run_dir=str(run.run_dir.relative_to(out)),
        epochs=run.config.epochs,
    )
    rd = RunDir(run.run_dir)
    summary = rd.read_summary() if rd.summary_path.is_file() else None
    if summary:
        status = str(summary.get("status"))
        state.status = status if status in (*FINAL, "failed") else "pending"
        state.reason = failure_reason(summary)
        state.epochs_done = int(summary.get("epochs_completed") or 0)
        state.wall_seconds = summary.get("wall_seconds")
    elif rd.metrics_path.is_file():
        state.epochs_done = len(rd.read_metrics())
    return state


def write_state(out: Path, name: str, runs: Mapping[str, RunState]) -> None:
    counts: dict[str, int] = {}
    for r in runs.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    doc = {
        "study": name,
        "updated": datetime.now().isoformat(timespec="seconds"),
        "counts": counts,
        "runs": {k: r.to_json() for k, r in runs.items()},
    }
    atomic_write_text(out / STATE_FILE, json.dumps(doc, indent=2) + "\n")


def read_state(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One display for the whole study: runs done / running / failed, epochs, ETA.

    On a terminal it is one live line (tqdm, over all epochs of the study, whose rate gives the
    ETA); otherwise one line per finished run. ETA = epochs still to train / epochs trained
    per second since this study process started.
    """

    def __init__(
        self,
        name: str,
        runs: dict[str, RunState],
        out: Path,
        stream: TextIO | None,
        live: bool | None = None,
    ) -> None:
        self.name, self.runs, self.out, self.stream = name, runs, out, stream
        self.live = bool(stream is not None and (stream.isatty() if live is None else live))
        self.t0 = time.monotonic()
        self.epochs0 = self.epochs_done()
        self.total_epochs = sum(r.epochs for r in runs.values())
        self.bar: Any = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total_epochs,
                initial=self.epochs0,
                unit="epoch",
                desc=name,
                file=stream,
                dynamic_ncols=True,
            )
            self._refresh()

    def epochs_done(self) -> int:
        return sum(min(r.epochs_done, r.epochs) for r in self.runs.values())

    def counts(self) -> tuple[int, int, int, int]:
        done = sum(1 for r in self.runs.values() if r.status in FINAL)
        running = sum(1 for r in self.runs.values() if r.status == "running")
        failed = sum(1 for r in self.runs.values() if r.status in ("failed", "diverged"))
        return done, running, failed, len(self.runs)

    def eta(self) -> float | None:
        trained = self.epochs_done() - self.epochs0
        elapsed = time.monotonic() - self.t0
        remaining = sum(
            max(r.epochs - r.epochs_done, 0)
            for r in self.runs.values()
            if r.status not in (*FINAL, "failed")
        )
        if remaining == 0:
            return 0.0
        if trained <= 0 or elapsed <= 0:
            return None
        return remaining / (trained / elapsed)

    def status_line(self) -> str:
        done, running, failed, total = self.counts()
        return (
            f"{done}/{total} runs done, {running} running, {failed} failed/diverged"
            f" | epochs {self.epochs_done()}/{self.total_epochs}"
            f" | elapsed {_duration(time.monotonic() - self.t0)}, ETA {_duration(self.eta())}"
        )

    def _refresh(self) -> None:
        if self.bar is None:
            return
        done, running, failed, total = self.counts()
        self.bar.set_postfix_str(
            f"runs {done}/{total} done, {running} running, {failed} failed", refresh=False
        )
        delta = self.epochs_done() - self.bar.n
        if delta > 0:
            self.bar.update(delta)  # tqdm's rate over epochs gives the ETA
        else:
            self.bar.refresh()

    def poll(self) -> None:
        """Count the epochs of running runs from their metrics files."""
        for r in self.runs.values():
            if r.status == "running":
                path = self.out / r.run_dir / "metrics.jsonl"
                if path.is_file():
                    with contextlib.suppress(OSError):
                        r.epochs_done = sum(
                            1 for line in path.read_text(encoding="utf-8").splitlines() if line
                        )
        self._refresh()

    def message(self, text: str) -> None:
        if self.stream is None:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def finished(self, state: RunState, detail: str | None = None) -> None:
        text = f"{self.name} {state.key}: {state.status}"
        if state.reason:
            text += f" ({state.reason})"
        if detail:
            text += f", {detail}"
        if not self.live:
            text += f" | {self.status_line()}"
        self.message(text)
        self._refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Hooks:
    """The runner's side of the executor protocol: keep states, state.json and display."""

    def __init__(self, plan: StudyPlan, runs: dict[str, RunState], progress: Progress) -> None:
        self.plan, self.runs, self.progress = plan, runs, progress
        self.last_write = 0.0

    def save(self, force: bool = True) -> None:
        now = time.monotonic()
        if force or now - self.last_write > 5.0:
            write_state(self.plan.out, self.plan.spec.name, self.runs)
            self.last_write = now

    def on_start(self, key: str) -> None:
        self.runs[key].status = "running"
        self.save()
        self.progress.poll()

    def on_finish(self, outcome: RunOutcome) -> None:
        state = self.runs[outcome.key]
        s = outcome.summary or {}
        state.status = outcome.status if outcome.status != "interrupted" else "pending"
        state.reason = outcome.reason
        state.epochs_done = int(s.get("epochs_completed") or state.epochs_done)
        state.wall_seconds = s.get("wall_seconds", state.wall_seconds)
        self.save()
        detail = None
        acc, best = s.get("final/val/acc"), s.get("best/val/acc")
        if outcome.status == "completed" and isinstance(acc, float) and isinstance(best, float):
            detail = (
                f"val acc {acc:.4f} (best {best:.4f} at epoch {s.get('best/epoch')}) "
                f"in {_duration(s.get('wall_seconds'))}"
            )
        self.progress.finished(state, detail)

    def on_tick(self) -> None:
        self.progress.poll()
        self.save(force=False)


# --------------------------------------------------------------------------------------------
# the runner


def study_meta(command: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    meta = run_meta()
    if command:
        meta["command"] = command
    meta.update(extra)
    return meta


def write_study_file(plan: StudyPlan, meta: Mapping[str, Any]) -> None:
    doc = spec_to_dict(plan.spec)
    doc["meta"] = dict(meta)
    atomic_write_text(plan.out / STUDY_FILE, dumps(doc))


def run_study(
    spec: StudySpec,
    out: str | Path,
    *,
    executor: str | Executor = "local",
    jobs: int | None = None,
    ray_address: str | None = None,
    stream: TextIO | None = sys.stderr,
    live: bool | None = None,
    command: str | None = None,
    stack_seeds: bool = False,
    momentum_twins: bool = False,
) -> StudyResult:
    """Run (or resume) every run of ``spec`` in the study directory ``out``.

    The report is a reader of the study directory, not part of running it: write it with
    :func:`normlab.report.write_report` (``normlab study`` does so when the runs end).

    ``executor``: a name in :data:`~normlab.study.executors.EXECUTORS` or an executor object;
    ``jobs``: runs in parallel (default: one per core); ``stream``: where the progress display
    goes (None: silent); ``live``: force the live display on or off (default: when ``stream``
    is a terminal). ``stack_seeds``: train each arm's pending seeds together as one stacked
    task (:mod:`normlab.train.stacked`: faster at batches up to 8 on a CPU; not
    bit-identical to separate runs, see its docs for the measured tolerance) where the executor
    supports it. ``momentum_twins``: train the arms of a group that differ only in
    ``norm.bn_momentum`` once per seed (:mod:`normlab.train.twins`: bit-identical to separate
    runs; not with ``stack_seeds``). Failed and diverged runs are recorded with their reason and do not stop the
    others. Raises ConfigError on a bad spec or a directory that holds other settings.
    """
    out = Path(out)
    if stack_seeds and momentum_twins:
        raise ConfigError(
            "choose one of stack_seeds (--stack-seeds) and momentum_twins (--momentum-twins)"
        )
    ex = (
        make_executor(executor, jobs=jobs, address=ray_address)
        if isinstance(executor, str)
        else executor
    )
    with study_lock(out):
        plan = prepare(spec, out)
        meta = study_meta(
            command,
            {
                "executor": ex.name,
                "resolved_runtime": dict(plan.runtime),
                "probes_not_available": list(plan.probes_dropped),
                **({"stack_seeds": True} if stack_seeds else {}),
                **({"momentum_twins": True} if momentum_twins else {}),
            },
        )
        old = out / STUDY_FILE
        if old.is_file():
            saved_doc = read_yaml_mapping(old, what="study file")
            created = (saved_doc.get("meta") or {}).get("created")
            if created:
                meta["first_created"] = (saved_doc.get("meta") or {}).get("first_created", created)
        write_study_file(plan, meta)
        runs = {r.key: run_state(r, out) for r in plan.runs}
        todo = [r for r in plan.runs if runs[r.key].status not in FINAL]
        write_state(out, plan.spec.name, runs)

        progress = Progress(plan.spec.name, runs, out, stream, live)
        if plan.probes_dropped:
            progress.message(
                f"note: optional probes {', '.join(plan.probes_dropped)} are not in this study "
                "(it was started without them); it keeps running without them"
            )
        skipped = len(plan.runs) - len(todo)
        progress.message(
            f"study {plan.spec.name}: {len(plan.runs)} runs ({len(plan.spec.seeds)} seeds), "
            f"{skipped} already finished, {len(todo)} to run with the {ex.name} executor"
            + (f" -> {out}" if todo else "")
        )
        hooks = _Hooks(plan, runs, progress)
        if todo and plan.spec.log:  # the MLflow experiment, once, before parallel runs
            prepare_store(parse_loggers(list(plan.spec.log)), out / "mlruns", plan.spec.name)
        try:
            if todo:
                threads = ex.threads_per_run(len(todo))
                tasks = [
                    RunTask(
                        key=r.key,
                        config=r.config,
                        run_dir=str(r.run_dir),
                        threads=threads,
                        info={"group": r.group, "variant": r.variant, "seed": r.seed},
                        devices=r.devices,
                        loggers=plan.spec.log,
                        study=plan.spec.name,
                        study_dir=str(out.resolve()),
                    )
                    for r in todo
                ]
                shared = "--stack-seeds" if stack_seeds else "--momentum-twins"
                if (stack_seeds or momentum_twins) and getattr(ex, "stacks", False):
                    tasks = _stacked(tasks, todo) if stack_seeds else _twinned(tasks, todo)
                    threads = ex.threads_per_run(len(tasks))
                    tasks = [_threads(t, threads) for t in tasks]
                elif stack_seeds or momentum_twins:
                    progress.message(
                        f"note: the {ex.name} executor trains each run on its own "
                        f"({shared} is for the local and serial executors)"
                    )
                ex.run(tasks, hooks)
        except KeyboardInterrupt:
            for st in runs.values():
                if st.status == "running":
                    st.status = "pending"
            write_state(out, plan.spec.name, runs)
            progress.close()
            raise
        finally:
            progress.close()
        # the run directories are the truth: re-read them (a worker may have died mid-write)
        for spec_run in plan.runs:
            fresh = run_state(spec_run, out)
            previous = runs[spec_run.key]
            if fresh.status == "pending" and previous.status == "failed":
                fresh.status, fresh.reason = "failed", previous.reason
            runs[spec_run.key] = fresh
        write_state(out, plan.spec.name, runs)
        if stream is not None:
            print(f"study {plan.spec.name}: {progress.status_line()}", file=stream)
            for r in runs.values():
                if r.status in ("failed", "diverged"):
                    print(f"  {r.key}: {r.status}: {r.reason}", file=stream)
        result = StudyResult(plan, runs)
    return result


def _stacked(tasks: list[RunTask], todo: Sequence[RunSpec]) -> list[RunTask]:
    """Each (group, variant)'s single-process pending runs as one stacked task (in plan
    order); an arm with one pending run keeps its plain task."""
    return _together(tasks, todo, lambda run: repr((run.group, run.variant)), stacked_task)


def _twinned(tasks: list[RunTask], todo: Sequence[RunSpec]) -> list[RunTask]:
    """Per (group, seed), the single-process pending runs whose configs differ only in
    ``norm.bn_momentum`` as one twin task (in plan order of its first member); the others keep
    their plain tasks."""

    from normlab.train.twins import without_momentum

    def family(run: RunSpec) -> str:
        return json.dumps([run.group, without_momentum(run.config)], sort_keys=True, default=str)

    return _together(tasks, todo, family, twin_task)


def _together(
    tasks: list[RunTask],
    todo: Sequence[RunSpec],
    key: Callable[[RunSpec], str],
    make: Callable[[Sequence[RunTask]], RunTask],
) -> list[RunTask]:
    """The single-process tasks with the same ``key`` as one task ``make(members)``, placed
    where the first member was; multi-process runs and lone members keep their own tasks."""
    families: dict[str, list[RunTask]] = {}
    order: list[str | RunTask] = []
    for task, run in zip(tasks, todo, strict=True):
        if run.devices > 1:
            order.append(task)
            continue
        k = key(run)
        if k not in families:
            families[k] = []
            order.append(k)
        families[k].append(task)
    out: list[RunTask] = []
    for item in order:
        if isinstance(item, RunTask):
            out.append(item)
        else:
            members = families[item]
            out.append(members[0] if len(members) == 1 else make(members))
    return out


def _threads(task: RunTask, threads: int) -> RunTask:
    members = tuple(replace(m, threads=threads) for m in task.members)
    return replace(task, threads=threads, members=members)


def plan_only(spec: StudySpec, out: str | Path) -> list[tuple[RunSpec, RunState]]:
    """The runs ``run_study`` would consider, with their current state (for ``--dry-run``)."""
    out = Path(out)
    plan = prepare(spec, out)
    return [(r, run_state(r, out)) for r in plan.runs]
