"""Where a study's runs execute: :data:`EXECUTORS` (``local`` worker processes, ``ray``).

An executor receives :class:`RunTask` s and reports back through :class:`Hooks`: ``on_start``
when a run begins, ``on_finish`` with its :class:`RunOutcome` (also for a run that failed or
whose worker died: the reason is recorded, the other runs go on), ``on_tick`` about once a
second. Every run goes through :func:`execute_run`, which calls
``fit(config, out=run_dir, resume=True)``: a fresh run starts, an interrupted one continues
from its last checkpoint, so an executor never has to know which is which.

Threads: each run gets ``threads`` intra-op threads (``cores // jobs`` locally, so that
``jobs`` runs in parallel do not oversubscribe the cores) unless its config sets
``runtime.threads`` itself.

Multi-process runs (``RunTask.devices`` N > 1, the study key ``devices``): :func:`execute_run`
trains them in a subprocess, ``python -m normlab train --config <run_dir>/study_config.yaml
--devices N --out <run_dir> [--resume] --quiet`` (torchrun, N ranks; ``PYTHONPATH`` inherited
with this checkout's source directory prepended), with ``--resume`` exactly when the run
directory already holds a run, so a run resumes from its checkpoint and a finished one is
returned as it is. Each rank gets ``threads // N`` intra-op threads. The local executor runs
single-process runs in its worker pool first, then the multi-process runs *one at a time* from
the study process with every core (``threads = cores``): a run with N processes would otherwise
need N of the ``--jobs`` slots at once. Ctrl-C stops the job's whole process group; the run
resumes with the study. A ``kill -9`` of the study process can leave the torchrun job running
until it finishes its run (its ranks are not tied to the study process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from normlab.config import TrainConfig
from normlab.errors import ConfigError
from normlab.registry import Registry
from normlab.store import CONFIG, METRICS, SUMMARY, RunDir, atomic_write_text
from normlab.study.layout import RUN_CONFIG, RUN_INFO, RUN_LOG
from normlab.yamlio import dumps

_LOCK = ".lock"


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to execute one run (picklable)."""

    key: str
    config: TrainConfig
    run_dir: str
    threads: int | None = None  # intra-op threads unless config.runtime.threads is set
    info: Mapping[str, Any] = field(default_factory=dict)  # group, variant, seed
    devices: int = 1  # processes the run trains in; > 1: a torchrun subprocess
    loggers: tuple[str, ...] = ()  # normlab.engine.loggers specs (the study's ``log``)
    study: str = ""  # the study's name and directory (the loggers' tags and MLflow store)
    study_dir: str = ""
    members: tuple[RunTask, ...] = ()  # a shared task: these runs train together
    shared: str = ""  # how the members train together: "stacked" | "twins" (see below)

    def run_keys(self) -> list[str]:
        """The runs this task trains (its own key, or its members' for a shared task)."""
        return [m.key for m in self.members] if self.members else [self.key]


def stacked_task(tasks: Sequence[RunTask]) -> RunTask:
    """One task that trains ``tasks`` (seeds of one configuration) stacked
    (:func:`normlab.train.stacked.fit_stacked`); it runs them one at a time when they cannot be
    stacked, and says why in their logs."""
    return _shared_task(tasks, "stacked")


def twin_task(tasks: Sequence[RunTask]) -> RunTask:
    """One task that trains ``tasks`` (arms that differ only in BN momentum, one seed) once
    (:func:`normlab.train.twins.fit_twins`); it runs them one at a time when they cannot share
    their training, and says why in their logs."""
    return _shared_task(tasks, "twins")


def _shared_task(tasks: Sequence[RunTask], shared: str) -> RunTask:
    key = "+".join(t.key for t in tasks)
    return dataclasses.replace(tasks[0], key=key, members=tuple(tasks), shared=shared)


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: ``status`` is completed | diverged | failed | interrupted."""

    key: str
    status: str
    reason: str | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)  # see RayExecutor


class Hooks(Protocol):
    def on_start(self, key: str) -> None: ...

    def on_finish(self, outcome: RunOutcome) -> None: ...

    def on_tick(self) -> None: ...


class Executor(Protocol):
    name: str
    stacks: bool  # whether it trains stacked tasks (else each run is its own task)

    def threads_per_run(self, n_tasks: int) -> int: ...

    def run(self, tasks: Sequence[RunTask], hooks: Hooks) -> None: ...


EXECUTORS: Registry[Callable[..., Executor]] = Registry("executor")


# --------------------------------------------------------------------------------------------
# one run, in whatever process executes it


def failure_reason(summary: Mapping[str, Any]) -> str | None:
    """A one-line reason from a run's summary.json (None for a completed run)."""
    status = summary.get("status")
    if status == "diverged":
        where = summary.get("diverged_at") or {}
        return (
            f"loss became NaN/Inf at epoch {where.get('epoch')}, step {where.get('step')}"
            if where
            else "loss became NaN/Inf"
        )
    if status == "failed":
        return str(summary.get("error") or "failed")
    return None


@contextlib.contextmanager
def _run_lock(run_dir: Path, wait_s: float = 30.0) -> Iterator[None]:
    """Hold an exclusive lock on the run directory while training in it: two processes must
    never write one run. Waits up to ``wait_s`` (a killed study's worker may still be dying)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / _LOCK, "a+")  # noqa: SIM115 - held for the duration of the run
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"{run_dir} is being trained by another process (it holds {_LOCK}); "
                        "is the same study running elsewhere?"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        fh.close()


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's Python-level stdout/stderr (prints, warnings) to ``path``."""
    with (
        open(path, "a", encoding="utf-8", buffering=1) as fh,
        contextlib.redirect_stdout(fh),
        contextlib.redirect_stderr(fh),
    ):
        yield


def execute_task(task: RunTask, events: Any = None) -> list[RunOutcome]:
    """:func:`execute_run` for a plain task, :func:`execute_stacked` for a stacked one,
    :func:`execute_twins` for momentum twins."""
    if task.members and task.shared == "twins":
        return execute_twins(task, events)
    if task.members:
        return execute_stacked(task, events)
    return [execute_run(task, events)]


def _with_threads(task: RunTask) -> TrainConfig:
    config = task.config
    changes: dict[str, Any] = {"progress": "off"}
    if config.runtime.threads is None and task.threads:
        changes["threads"] = task.threads
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, **changes))


def execute_stacked(task: RunTask, events: Any = None) -> list[RunOutcome]:
    """Train a stacked task's members together; never raises for a failed run. Output goes to
    the first member's ``train.log`` (the others' logs say so). Members that cannot be stacked
    (the reason is printed) run one after another with :func:`execute_run`."""
    from normlab.train.stacked import fit_stacked, stackable

    return _execute_together(task, events, stackable, fit_stacked, "stacked", "stacked")


def execute_twins(task: RunTask, events: Any = None) -> list[RunOutcome]:
    """Train momentum twins (:func:`normlab.train.twins.fit_twins`) once; as
    :func:`execute_stacked` otherwise."""
    from normlab.train.twins import fit_twins, twinnable

    return _execute_together(task, events, twinnable, fit_twins, "once with", "shared")


def _execute_together(
    task: RunTask,
    events: Any,
    check: Callable[[list[TrainConfig]], str | None],
    train: Callable[..., Any],
    how: str,
    label: str,
) -> list[RunOutcome]:
    """Train ``task``'s members with ``train`` (``fit_stacked``, ``fit_twins``) when ``check``
    allows it; ``how`` words the logs (``trains {how} …``), ``label`` the fallback (``not
    {label} (why)``)."""
    members = list(task.members)
    configs = [_with_threads(m) for m in members]
    why = check(configs)
    if why is not None or any(m.devices > 1 for m in members):
        return _one_at_a_time(members, why or "multi-process runs", events, label)
    dirs = [Path(m.run_dir) for m in members]
    log = dirs[0] / RUN_LOG
    try:
        with contextlib.ExitStack() as held:
            for d in dirs:
                held.enter_context(_run_lock(d))
            for m, d in zip(members[1:], dirs[1:], strict=True):
                with open(d / RUN_LOG, "a", encoding="utf-8") as fh:
                    fh.write(
                        f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {m.key} trains "
                        f"{how} {', '.join(x.key for x in members)}; see {log}\n"
                    )
            held.enter_context(_output_to(log))
            print(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {how} "
                f"{', '.join(m.key for m in members)}"
            )
            callbacks = [[_info_callback(m, events), *_loggers(m)] for m in members]
            results = train(configs, dirs, callbacks=callbacks, verbose=True)
    except ConfigError as exc:
        return _one_at_a_time(members, str(exc), events, label)
    except KeyboardInterrupt:
        return [
            RunOutcome(m.key, "interrupted", "interrupted (KeyboardInterrupt)") for m in members
        ]
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return [
            RunOutcome(m.key, "failed", reason, RunDir(d).read_summary() or {})
            for m, d in zip(members, dirs, strict=True)
        ]
    return [
        RunOutcome(m.key, r.status, failure_reason(r.summary), RunDir(d).read_summary() or {})
        for m, r, d in zip(members, results, dirs, strict=True)
    ]


def _one_at_a_time(
    members: Sequence[RunTask], why: str, events: Any, label: str
) -> list[RunOutcome]:
    outcomes = []
    for m in members:
        Path(m.run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(m.run_dir) / RUN_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"--- not {label} ({why}): trained on its own\n")
        outcomes.append(execute_run(m, events))
        if outcomes[-1].status == "interrupted":
            break
    return outcomes


def execute_run(task: RunTask, events: Any = None) -> RunOutcome:
    """Train (or resume) one run; never raises for a failed run, returns its outcome.

    ``events``: an optional queue receiving ``("start", key)`` when training begins.
    Output goes to ``<run_dir>/train.log``; the run's place in the study and its data sizes
    to ``<run_dir>/study_run.json``.
    """
    run_dir = Path(task.run_dir)
    config = _with_threads(task)
    status, reason = "failed", None
    try:
        with _run_lock(run_dir), _output_to(run_dir / RUN_LOG):
            print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {task.key}")
            if task.devices > 1:
                status, reason = _fit_devices(task, config, events)
            else:
                result = _fit(task, config, events)
                status, reason = result.status, failure_reason(result.summary)
    except KeyboardInterrupt:
        status, reason = "interrupted", "interrupted (KeyboardInterrupt)"
    except Exception as exc:
        status, reason = "failed", f"{type(exc).__name__}: {exc}"
    summary = RunDir(run_dir).read_summary() or {}
    return RunOutcome(task.key, status, reason, summary)


def _fit(task: RunTask, config: TrainConfig, events: Any) -> Any:
    from normlab.train import fit

    callbacks = [_info_callback(task, events), *_loggers(task)]
    return fit(config, out=task.run_dir, resume=True, callbacks=callbacks, verbose=True)


def _info_callback(task: RunTask, events: Any) -> Any:
    """Writes the run's ``study_run.json`` and reports its start when training begins."""
    from normlab.train import Callback

    run_dir = Path(task.run_dir)

    class _Info(Callback):
        observes_only = True

        def on_fit_start(self, state: Any) -> None:
            info = {
                "key": task.key,
                **dict(task.info),
                "n_train": int(state.data.train_labels.numel()),
                "n_val": int(state.data.val_labels.numel()),
                "start_epoch": state.start_epoch,
            }
            atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")
            if events is not None:
                events.put(("start", task.key))

    return _Info()


def _loggers(task: RunTask) -> list[Any]:
    """The study's loggers for one run: its MLflow run tagged with its place in the study."""
    from normlab.engine.loggers import make_loggers, parse_loggers

    if not task.loggers:
        return []
    info = dict(task.info)
    tags = {
        "normlab.study": task.study,
        "normlab.group": info.get("group"),
        "normlab.variant": info.get("variant"),
        "normlab.seed": info.get("seed"),
        "normlab.run_name": task.key,
    }
    store = Path(task.study_dir) / "mlruns" if task.study_dir else None
    return make_loggers(parse_loggers(list(task.loggers)), tags=tags, mlflow_store=store)


def _data_sizes(config: TrainConfig) -> dict[str, int]:
    """The run's split sizes (for study_run.json), or nothing when the data cannot be built."""
    try:
        from normlab.data import build_data

        bundle = build_data(config.data, config.data.split_seed_for(config.seed))
    except Exception:  # the run itself reports a data problem
        return {}
    return {"n_train": int(bundle.train_labels.numel()), "n_val": int(bundle.val_labels.numel())}


def devices_command(task: RunTask, config_path: Path, *, resume: bool) -> list[str]:
    """The command line that trains ``task`` in ``task.devices`` processes."""
    cmd = [
        sys.executable, "-m", "normlab", "train",
        "--config", str(config_path),
        "--devices", str(task.devices),
        "--out", str(task.run_dir),
    ]  # fmt: skip
    if resume:
        cmd.append("--resume")
    return [*cmd, "--quiet"]


def _fit_devices(task: RunTask, config: TrainConfig, events: Any) -> tuple[str, str | None]:
    """Train ``task`` with ``normlab train --devices N`` in a subprocess (its own session, so
    that stopping it stops torchrun and every rank); returns (status, reason)."""
    from normlab.config import config_to_dict

    run_dir = Path(task.run_dir)
    per_rank = max(1, (task.threads or available_cores()) // task.devices)
    if task.config.runtime.threads is None:
        config = dataclasses.replace(
            config, runtime=dataclasses.replace(config.runtime, threads=per_rank)
        )
    config_path = run_dir / RUN_CONFIG
    atomic_write_text(config_path, dumps(config_to_dict(config)))
    resume = RunDir(run_dir).exists()
    start_epoch = (
        len(RunDir(run_dir).read_metrics()) if RunDir(run_dir).metrics_path.is_file() else 0
    )
    info = {"key": task.key, **dict(task.info), **_data_sizes(config), "start_epoch": start_epoch}
    info["devices"] = task.devices
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_normlab_source_root(), env.get("PYTHONPATH")) if p
    )
    env.setdefault("OMP_NUM_THREADS", str(config.runtime.threads or per_rank))
    cmd = devices_command(task, config_path, resume=resume)
    print("$ " + " ".join(cmd), flush=True)
    if events is not None:
        events.put(("start", task.key))
    with open(run_dir / RUN_LOG, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    summary = RunDir(run_dir).read_summary() or {}
    status = str(summary.get("status") or "")
    if status in ("completed", "diverged", "failed"):
        return status, failure_reason(summary)
    return "failed", (
        f"the {task.devices}-process job exited with status {code} before finishing "
        f"(see {run_dir / RUN_LOG}); rerun the study to resume it"
    )


# --------------------------------------------------------------------------------------------
# serial: this process, one run after another


class SerialExecutor:
    """Runs one run after another in the study process itself: no worker start-up cost, and
    a debugger or profiler sees the training code. Each run gets all cores' threads."""

    name = "serial"
    stacks = True  # trains stacked tasks (RunTask.members)

    def __init__(self, jobs: int | None = None, **_: Any) -> None:
        if jobs not in (None, 1):
            raise ConfigError(f"the serial executor runs one run at a time; got --jobs {jobs}")

    def threads_per_run(self, n_tasks: int) -> int:
        return available_cores()

    def run(self, tasks: Sequence[RunTask], hooks: Hooks) -> None:
        import torch

        threads = torch.get_num_threads()
        try:
            for task in tasks:
                for key in task.run_keys():
                    hooks.on_start(key)
                outcomes = execute_task(task)
                for outcome in outcomes:
                    hooks.on_finish(outcome)
                if any(o.status == "interrupted" for o in outcomes):
                    raise KeyboardInterrupt
                hooks.on_tick()
        finally:
            torch.set_num_threads(threads)  # fit set the run's; give the caller its own back


# --------------------------------------------------------------------------------------------
# local: worker processes on this machine


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_EVENTS: Any = None


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when the study process dies, however it dies (kill -9 included):
    an orphan must not go on writing a run that the resumed study is training again."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="normlab-parent-watch").start()


def _worker_init(events: Any, parent: int, threads: int) -> None:
    import signal

    global _EVENTS
    _EVENTS = events
    # Ctrl-C reaches the whole process group; the study process decides (it stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def _worker_run(task: RunTask) -> list[RunOutcome]:
    return execute_task(task, _EVENTS)


class LocalExecutor:
    """Runs in ``jobs`` worker processes (spawned, so no state leaks from the study process);
    ``jobs`` defaults to the number of cores, capped by the number of runs. Multi-process runs
    (``devices > 1``) run afterwards, one at a time, each using every core."""

    name = "local"
    stacks = True

    def __init__(self, jobs: int | None = None, **_: Any) -> None:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs

    def _jobs(self, n_tasks: int) -> int:
        return max(1, min(self.jobs or available_cores(), max(n_tasks, 1)))

    def threads_per_run(self, n_tasks: int) -> int:
        return max(1, available_cores() // self._jobs(n_tasks))

    def run(self, tasks: Sequence[RunTask], hooks: Hooks) -> None:
        import multiprocessing

        if not tasks:
            return
        single = [t for t in tasks if t.devices <= 1]
        multi = [t for t in tasks if t.devices > 1]
        if single:
            ctx = multiprocessing.get_context("spawn")
            events = ctx.Queue()
            pending = single
            jobs = self._jobs(len(single))
            threads = self.threads_per_run(len(single))
            try:
                while pending:
                    pending = self._run_pool(ctx, events, pending, jobs, threads, hooks)
            finally:
                events.close()
        # Multi-process runs one at a time, each with every core (see the module docstring).
        for task in multi:
            hooks.on_start(task.key)
            outcome = execute_run(dataclasses.replace(task, threads=available_cores()))
            hooks.on_finish(outcome)
            if outcome.status == "interrupted":
                raise KeyboardInterrupt
            hooks.on_tick()

    def _run_pool(
        self,
        ctx: Any,
        events: Any,
        tasks: list[RunTask],
        jobs: int,
        threads: int,
        hooks: Hooks,
    ) -> list[RunTask]:
        """Run ``tasks`` in one pool; return those to retry in a new pool when a worker died
        (runs that had started in a dead worker are reported failed, not retried: a run that
        kills its process would kill the next one too)."""
        started: set[str] = set()
        finished: set[str] = set()
        by_key = {t.key: t for t in tasks}
        pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(events, os.getpid(), threads),
        )
        futures: dict[Future[list[RunOutcome]], RunTask] = {}
        broken = False
        try:
            for t in tasks:
                futures[pool.submit(_worker_run, t)] = t
            not_done = set(futures)
            while not_done:
                done, not_done = wait(not_done, timeout=1.0, return_when=FIRST_COMPLETED)
                self._drain(events, started, hooks)
                for fut in done:
                    task = futures[fut]
                    try:
                        outcomes = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as exc:  # pickling errors and the like
                        reason = f"{type(exc).__name__}: {exc}"
                        outcomes = [RunOutcome(k, "failed", reason) for k in task.run_keys()]
                    finished.add(task.key)
                    for outcome in outcomes:
                        hooks.on_finish(outcome)
                hooks.on_tick()
                if broken:
                    break
        except BaseException:
            # Ctrl-C (or an error in a hook): stop the workers now. Their runs lose at most the
            # epoch in progress (checkpoints are atomic) and resume with the study.
            for proc in list(getattr(pool, "_processes", {}).values()):  # no public API for it
                with contextlib.suppress(Exception):
                    proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self._drain(events, started, hooks)
        if not broken:
            return []
        retry = []
        for key, task in by_key.items():
            if key in finished:
                continue
            if any(k in started for k in task.run_keys()):
                finished.add(key)
                for k in task.run_keys():
                    hooks.on_finish(
                        RunOutcome(
                            k,
                            "failed",
                            "its worker process died (killed, out of memory or crashed); rerun "
                            "the study to resume it",
                        )
                    )
            else:
                retry.append(task)
        return retry

    @staticmethod
    def _drain(events: Any, started: set[str], hooks: Hooks) -> None:
        while True:
            try:
                kind, key = events.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                return
            if kind == "start" and key not in started:
                started.add(key)
                hooks.on_start(key)


EXECUTORS.register("serial", SerialExecutor)
EXECUTORS.register("local", LocalExecutor)


# --------------------------------------------------------------------------------------------
# ray: a Ray cluster (optional extra normlab[ray])


def _normlab_source_root() -> str:
    import normlab

    return str(Path(normlab.__file__).resolve().parents[1])


def _ray_execute(task: RunTask) -> RunOutcome:
    """Ray task body: run, then return the run's small files, so that a driver that does not
    share the workers' filesystem still gets config, metrics and summary (not checkpoints)."""
    outcome = execute_run(task)
    files: dict[str, bytes] = {}
    for name in (CONFIG, METRICS, SUMMARY, RUN_INFO):
        path = Path(task.run_dir) / name
        if path.is_file():
            files[name] = path.read_bytes()
    return dataclasses.replace(outcome, files=files)


class RayExecutor:
    """Sends runs to a Ray cluster: ``address`` (``--ray-address``; ``auto`` finds a running
    one) or, with none, a local Ray instance started for the study and stopped after it.

    Each run is a task with ``num_cpus = threads`` (``--jobs J`` sets ``threads`` to the
    cluster's CPUs // J; by default 1 thread per run, as many runs as CPUs). At most that many
    tasks are in flight; the rest wait here, so a killed driver leaves at most that many runs to
    resume. The study directory should be on a filesystem every node sees (checkpoints are
    written by the nodes); when it is not, finished runs' config, metrics and summary are
    copied back to the driver so the report is complete, but interrupted runs resume from
    scratch. Workers import normlab from their environment; the driver's source directory is
    prepended to their ``PYTHONPATH`` for a checkout that is not installed.
    """

    name = "ray"
    stacks = False  # each Ray task trains one run

    def __init__(self, jobs: int | None = None, address: str | None = None, **_: Any) -> None:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        self.address = address
        self._started = False

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray: pip install 'normlab[ray]' (or pip install ray)"
            ) from None
        if not ray.is_initialized():
            path = os.pathsep.join(
                p for p in (_normlab_source_root(), os.environ.get("PYTHONPATH")) if p
            )
            kwargs: dict[str, Any] = {
                "runtime_env": {"env_vars": {"PYTHONPATH": path}},
                "log_to_driver": False,
                "configure_logging": False,
            }
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["include_dashboard"] = False
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise ConfigError(f"--ray-address {self.address}: {exc}") from None
            self._started = True
        return ray

    def _cpus(self) -> int:
        ray = self._ray()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def threads_per_run(self, n_tasks: int) -> int:
        if self.jobs is None:
            return 1
        return max(1, self._cpus() // self.jobs)

    def run(self, tasks: Sequence[RunTask], hooks: Hooks) -> None:
        if not tasks:
            return
        ray = self._ray()
        in_flight: dict[Any, RunTask] = {}
        try:
            threads = max((t.threads or 1) for t in tasks)
            window = self.jobs or max(1, self._cpus() // threads)
            remote = ray.remote(num_cpus=threads, max_retries=0)(_ray_execute)
            pending = list(tasks)
            while pending or in_flight:
                while pending and len(in_flight) < window:
                    task = pending.pop(0)
                    in_flight[remote.remote(task)] = task
                    hooks.on_start(task.key)
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in done:
                    task = in_flight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the worker died, or the task raised
                        cause = getattr(exc, "cause", None) or exc
                        text = str(cause).strip().splitlines()
                        outcome = RunOutcome(
                            task.key,
                            "failed",
                            f"ray: {type(cause).__name__}: {text[-1] if text else ''}",
                        )
                    self._mirror(task, outcome)
                    hooks.on_finish(outcome)
                hooks.on_tick()
        except BaseException:
            for ref in in_flight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            if self._started:
                ray.shutdown()
                self._started = False

    @staticmethod
    def _mirror(task: RunTask, outcome: RunOutcome) -> None:
        """Write back the run's files when the driver does not see the worker's copy."""
        from normlab.store import atomic_write_bytes

        run_dir = Path(task.run_dir)
        summary = run_dir / "summary.json"
        if outcome.files.get("summary.json") and (
            not summary.is_file() or summary.read_bytes() != outcome.files["summary.json"]
        ):
            for name, data in outcome.files.items():
                atomic_write_bytes(run_dir / name, data)


EXECUTORS.register("ray", RayExecutor)


def make_executor(name: str, *, jobs: int | None = None, address: str | None = None) -> Executor:
    """The executor registered as ``name`` (ConfigError listing the names when unknown)."""
    if address and name != "ray":
        raise ConfigError(f"--ray-address is for --executor ray, not {name!r}")
    return EXECUTORS.get(name)(jobs=jobs, address=address)
