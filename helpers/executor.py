"""Run per-subject work sequentially, in local processes or on a Dask cluster.

One function, :func:`run_tasks`, maps a picklable module-level function over a mapping
``{subject: item}`` and returns one :class:`TaskOutcome` per subject, in the order of the
mapping, whichever executor ran it.  An exception raised for one subject is caught and recorded
(one bad scan never kills the cohort); :class:`KeyboardInterrupt` and :class:`SystemExit`
propagate.

Executors
---------
``sequential``
    A plain loop in this process (the default; no start-up cost, easiest to debug).
``processes``
    :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method, which is
    safe inside Jupyter / papermill kernels and behaves the same on Linux, macOS and Windows
    (``fork`` would copy the kernel's threads and locks).  Spawned workers re-import the
    function's module, so the function must be importable (defined in ``helpers`` or another
    installed module, not in a notebook cell).  A worker that dies (segfault, out-of-memory
    kill) breaks the pool: the subjects that were in flight are re-run one at a time in a fresh
    pool so that the one that kills its worker is recorded as a failure and the rest finish
    (after :data:`MAX_DEATHS_IN_A_ROW` such deaths in a row the remaining subjects are failed
    without running: the workers cannot run anything).
``dask``
    :mod:`dask.distributed`: ``Client(scheduler)`` when a scheduler address is given (an HPC
    cluster started with dask-jobqueue, see ``benchmarks/README.md``), else a
    ``LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True)``
    started for the call (with :data:`LOCAL_DASK_CONFIG`) and closed afterwards.  The workers
    must be able to import the function's module (install esma in the workers' environment).
    A subject whose task kills its worker ends as ``KilledWorker``; if the own LocalCluster has
    no workers left for :data:`DASK_NO_WORKER_TIMEOUT_S` the remaining subjects fail (an
    external cluster is waited for: a batch queue may still be starting its jobs).

Memory stays flat with the cohort size: at most ``2 * workers`` (dask: ``2 * workers *
threads_per_worker``) items are in flight, the next one is submitted when one finishes, and
each result is collected as it completes.  ``func`` should therefore return small tables, not
arrays.

Native thread pools (OpenMP / BLAS / ITK / torch) inside the workers are limited to
``threads_per_worker`` threads per task for ``processes`` (each worker process runs one task at
a time) and to one thread per task for ``dask`` (each worker runs ``threads_per_worker`` tasks
at once), so that ``workers x threads`` never oversubscribes the cores.  The sequential executor
leaves the thread pools of the calling process untouched.

Every process that runs subjects (the workers, and the calling process for ``sequential``) lets
``malloc`` reuse freed arrays (:func:`keep_freed_memory`): without it each temporary volume is
mapped and page-faulted in anew, which cost 15-40 % of the CPU time on a virtual machine.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import itertools
import logging
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from helpers.errors import ConfigError
from helpers.validate import SettingError

__all__ = [
    "EXECUTOR_KINDS",
    "LOCAL_DASK_CONFIG",
    "ExecutorConfig",
    "TaskOutcome",
    "dask_environment",
    "keep_freed_memory",
    "run_tasks",
    "successful_values",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: The executor kinds a study may name.
EXECUTOR_KINDS: tuple[str, ...] = ("sequential", "processes", "dask")
#: Start method of the process pool (safe in Jupyter / papermill; same on every OS).
MP_CONTEXT = "spawn"
#: Worker deaths on consecutive subjects (each run alone) after which the rest are not run.
MAX_DEATHS_IN_A_ROW = 5
#: Environment variables that size native thread pools in a worker.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)
_SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecutorConfig:
    """How per-subject work is run.

    Parameters
    ----------
    kind : {"sequential", "processes", "dask"}
        The executor (see the module docstring).
    workers : int
        Number of worker processes (``processes``) or LocalCluster workers (``dask`` without a
        ``scheduler``).  Ignored by ``sequential``.
    scheduler : str or None
        ``dask`` only: address of an existing scheduler (``tcp://host:port``).  None starts a
        LocalCluster with ``workers`` workers.
    threads_per_worker : int
        ``processes``: native (OpenMP / BLAS / ITK) threads per worker process.  ``dask``:
        tasks run at once per LocalCluster worker (each with one native thread).

    Raises
    ------
    ConfigError
        When a value is out of range; the message names the ``executor.<key>``.

    Examples
    --------
    >>> ExecutorConfig.from_mapping({"kind": "processes", "workers": 2}).workers
    2
    >>> ExecutorConfig.from_mapping(None).kind
    'sequential'
    """

    kind: Literal["sequential", "processes", "dask"] = "sequential"
    workers: int = 1
    scheduler: str | None = None
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            msg = f"{self.kind!r} is not one of {', '.join(EXECUTOR_KINDS)}"
            key = "executor.kind"
            raise SettingError(key, msg)
        for name in ("workers", "threads_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"must be a whole number >= 1, got {value!r}"
                key = f"executor.{name}"
                raise SettingError(key, msg)
        if self.scheduler is not None:
            if self.kind != "dask":
                msg = f"only used with kind 'dask', but kind is {self.kind!r}"
                key = "executor.scheduler"
                raise SettingError(key, msg)
            if not isinstance(self.scheduler, str) or not self.scheduler.startswith(
                _SCHEDULER_SCHEMES
            ):
                msg = f"expected an address such as 'tcp://host:8786', got {self.scheduler!r}"
                key = "executor.scheduler"
                raise SettingError(key, msg)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> ExecutorConfig:
        """Build and validate a configuration from a study YAML ``executor:`` block.

        Parameters
        ----------
        d : mapping or None
            Keys ``kind``, ``workers``, ``scheduler``, ``threads_per_worker``; missing keys take
            their defaults; None or an empty mapping gives the sequential executor.

        Returns
        -------
        ExecutorConfig

        Raises
        ------
        ConfigError
            For an unknown key, a value of the wrong type or out of range (the message names
            ``executor.<key>``), or when ``d`` is not a mapping.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            msg = (
                f"executor: expected a mapping with keys kind, workers, scheduler, "
                f"threads_per_worker, got {type(d).__name__} {d!r}"
            )
            raise ConfigError(msg)
        known = ("kind", "workers", "scheduler", "threads_per_worker")
        unknown = [str(k) for k in d if k not in known]
        if unknown:
            msg = f"unknown key (allowed: {', '.join(known)})"
            key = f"executor.{unknown[0]}"
            raise SettingError(key, msg)
        kwargs: dict[str, Any] = {}
        if d.get("kind") is not None:
            kwargs["kind"] = d["kind"]
        for name in ("workers", "threads_per_worker"):
            if d.get(name) is not None:
                kwargs[name] = d[name]
        if d.get("scheduler") is not None:
            kwargs["scheduler"] = d["scheduler"]
        return cls(**kwargs)

    @property
    def max_parallel(self) -> int:
        """Tasks that run at the same time (1 for ``sequential``; unknown cluster size -> workers)."""
        if self.kind == "sequential":
            return 1
        if self.kind == "dask":
            return self.workers * self.threads_per_worker
        return self.workers


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one item.

    Attributes
    ----------
    key : str
        The subject ID (the key of the ``items`` mapping).
    ok : bool
        True when ``func`` returned.
    value : Any
        ``func``'s return value when ``ok``, else None.
    error : str or None
        ``"TypeName: message"`` when not ``ok`` (esma errors already name the file).
    seconds : float
        Wall time of the call in s (measured where it ran; 0 when the worker died).
    traceback : str or None
        The formatted traceback when ``func`` raised (for logs / debugging), else None.
    """

    key: str
    ok: bool
    value: Any
    error: str | None
    seconds: float
    traceback: str | None = None


# --------------------------------------------------------------------------------------------
# what runs in the worker
# --------------------------------------------------------------------------------------------
_THREAD_LIMIT: int | None = None  # per-process: the native thread limit already applied
_ALLOCATOR_TUNED: bool | None = None  # per-process: keep_freed_memory() already called (result)

#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory(trim_threshold_mb: int = 256) -> bool:
    """Let this process's ``malloc`` reuse freed arrays instead of giving them back at once.

    By default glibc serves each array larger than a few MB (a volume, a distance map) with a
    fresh ``mmap`` and unmaps it when freed, so every temporary array of every subject
    page-faults its memory in again: on the 2-core test machine (a virtual machine) that kernel
    time was 15 % of the metrics stage without bias correction in one process, and 40 % of the
    CPU when two workers ran side by side (``benchmarks/README.md``).  This raises the ``mmap``
    threshold to its maximum (32 MB; larger arrays still get their own mapping) and keeps up to
    ``trim_threshold_mb`` of freed heap for reuse, so memory stays flat per process while
    repeated subjects reuse it.  Results are unchanged (only where memory comes from).

    :func:`run_tasks` calls it once in every process that runs subjects: each worker process
    (``processes`` and ``dask``) and, for ``sequential``, the calling process.

    Parameters
    ----------
    trim_threshold_mb : int
        Freed memory at the top of the heap (MB) kept before ``malloc`` returns it.

    Returns
    -------
    bool
        False where the C library has no glibc ``mallopt`` (macOS, Windows, musl): nothing
        changed.
    """
    global _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
          and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mb) * 2**20) == 1)
    _ALLOCATOR_TUNED = ok
    return ok


def _tune_allocator_once() -> None:
    """:func:`keep_freed_memory`, the first time this process runs a subject."""
    if _ALLOCATOR_TUNED is None:
        keep_freed_memory()


def _prepare_worker(threads: int) -> None:
    """Once per worker process: native thread limit and :func:`keep_freed_memory`."""
    _tune_allocator_once()
    _limit_native_threads(threads)


def _limit_native_threads(n: int) -> None:
    """Limit OpenMP / BLAS / ITK / torch thread pools of this (worker) process to ``n``."""
    global _THREAD_LIMIT
    if _THREAD_LIMIT == n:
        return
    for var in _THREAD_ENV:
        os.environ[var] = str(n)  # libraries loaded later read these
    try:  # libraries already loaded (numpy's BLAS, OpenMP): threadpoolctl (a scikit-learn dep)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    _THREAD_LIMIT = n


def _format_error(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: killed (SIGKILL) when the process that started it ends."""
    from helpers.lifecycle import die_with_parent

    die_with_parent(parent_pid)


def _call(func: Callable[[Any], Any], key: str, item: Any, threads: int | None) -> TaskOutcome:
    """Run ``func(item)``, timing it and turning an exception into a failed outcome."""
    if threads is not None:
        _prepare_worker(threads)
    start = time.perf_counter()
    try:
        value = func(item)
    except Exception as exc:  # noqa: BLE001 - one bad subject must not kill the cohort
        seconds = time.perf_counter() - start
        return TaskOutcome(
            key=key,
            ok=False,
            value=None,
            error=_format_error(exc),
            seconds=seconds,
            traceback=traceback.format_exc(),
        )
    return TaskOutcome(
        key=key, ok=True, value=value, error=None, seconds=time.perf_counter() - start
    )


# --------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------
def _run_sequential(
    func: Callable[[Any], Any], items: Mapping[str, Any], _config: ExecutorConfig
) -> Iterator[TaskOutcome]:
    for key, item in items.items():
        yield _call(func, key, item, None)


def _crash_outcome(key: str, exc: BaseException) -> TaskOutcome:
    """The outcome of an item whose worker process died while running it alone."""
    return TaskOutcome(
        key=key,
        ok=False,
        value=None,
        error=f"{type(exc).__name__}: the worker process died while running this subject "
        f"(crash or out-of-memory kill): {exc}",
        seconds=0.0,
    )


def _run_processes(
    func: Callable[[Any], Any], items: Mapping[str, Any], config: ExecutorConfig
) -> Iterator[TaskOutcome]:
    """Process pool, lazily fed; survives worker deaths (see module docstring)."""
    context = multiprocessing.get_context(MP_CONTEXT)
    pending: deque[str] = deque(items)  # not yet submitted
    suspects: deque[str] = deque()  # in flight when the pool broke: re-run one at a time
    window = 2 * config.workers
    threads = config.threads_per_worker

    deaths_in_a_row = 0  # solo crashes without a success in between

    while pending or suspects:
        if deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            error = (
                f"BrokenProcessPool: not run: worker processes died on the last "
                f"{deaths_in_a_row} subjects in a row, giving up (see the worker's stderr)"
            )
            for key in [*suspects, *pending]:
                yield TaskOutcome(key, False, None, error, 0.0)
            return
        pool = cf.ProcessPoolExecutor(
            max_workers=config.workers,
            mp_context=context,
            initializer=_die_with_parent,  # issue 16: no worker outlives the run
            initargs=(os.getpid(),),
        )
        in_flight: dict[cf.Future[TaskOutcome], str] = {}
        solo: str | None = None  # the suspect running alone, whose crash is its own
        broken = False
        clean_exit = False
        try:
            while pending or suspects or in_flight:
                if suspects:
                    if not in_flight:
                        solo = suspects.popleft()
                        in_flight[pool.submit(_call, func, solo, items[solo], threads)] = solo
                else:
                    while pending and len(in_flight) < window:
                        key = pending.popleft()
                        in_flight[pool.submit(_call, func, key, items[key], threads)] = key
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    key = in_flight.pop(fut)
                    try:
                        outcome = fut.result()
                    except BrokenProcessPool as exc:
                        broken = True
                        if key == solo:
                            deaths_in_a_row += 1
                            yield _crash_outcome(key, exc)
                        else:
                            suspects.append(key)
                    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable item/result
                        yield TaskOutcome(key, False, None, _format_error(exc), 0.0)
                    else:
                        deaths_in_a_row = 0
                        yield outcome
                if broken:
                    # every other in-flight future fails too (unless it finished just before)
                    for fut, key in in_flight.items():
                        try:
                            yield fut.result()
                        except BrokenProcessPool:
                            suspects.append(key)
                        except Exception as exc:  # noqa: BLE001 - recorded, run goes on
                            yield TaskOutcome(key, False, None, _format_error(exc), 0.0)
                    in_flight.clear()
                    if suspects:
                        log.warning(
                            "a worker process died; re-running %d subject(s) one at a time "
                            "to find the one that kills it",
                            len(suspects),
                        )
                    break
            clean_exit = True
        finally:
            if clean_exit:
                pool.shutdown(wait=True, cancel_futures=True)
            else:  # interrupted (KeyboardInterrupt, generator closed): do not wait for work
                processes = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in processes:
                    if proc.is_alive():
                        proc.terminate()


#: Seconds without any dask worker after which the items left are failed (own LocalCluster).
DASK_NO_WORKER_TIMEOUT_S = 120.0
#: How often (s) the dask loop checks that workers are still there while waiting.
_DASK_POLL_S = 5.0
#: dask settings of an own LocalCluster (its scheduler and worker processes).
#:
#: - Only tasks that are executing on a worker are blamed when it dies (no queue on the
#:   workers: saturation 1.0), so a subject that kills its worker fails after dying on three
#:   workers (dask's default is four) while innocent subjects are not blamed.
#: - The workers' periodic bookkeeping runs less often: the statistical profiler (a thread that
#:   takes the GIL every 10 ms), the event-loop health tick (every 20 ms), the nanny's memory
#:   monitor (every 100 ms) and the system monitor (every 500 ms).  Each takes the GIL from the
#:   task's thread; together they cost 2 workers about 8 % of their throughput on the 2-core
#:   test machine (metrics stage with N4, 60 subjects: 1.22 against 1.33 subjects/s for
#:   ``processes``; with these settings 1.31.  On 1000 subjects 2 workers went from 1.79x to
#:   1.91x of sequential, ``benchmarks/results/scale.json``).  Memory limits are still
#:   enforced, checked once a second.  No single setting gave the gain on its own.
LOCAL_DASK_CONFIG: dict[str, Any] = {
    "distributed.scheduler.allowed-failures": 2,
    "distributed.scheduler.worker-saturation": 1.0,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


def dask_environment() -> dict[str, str]:
    """:data:`LOCAL_DASK_CONFIG` as dask's environment variables, for a cluster you start.

    The workers of a cluster started outside esma (dask-jobqueue, ``dask worker``) read their
    own configuration, not the driver's: export these variables in their job script
    (``job_script_prologue``), and in the environment of the process that runs the scheduler.

    Returns
    -------
    dict of str to str
        ``{"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False", ...}``; dask reads each
        value as a Python literal, or as a string (``"1s"``) when it is none.

    Examples
    --------
    >>> dask_environment()["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"]
    '1s'
    """
    return {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in LOCAL_DASK_CONFIG.items()
    }


def _dask_failure(key: str, error: str) -> TaskOutcome:
    return TaskOutcome(key=key, ok=False, value=None, error=error, seconds=0.0)


def _restore_environ(saved: Mapping[str, str]) -> None:
    """Make ``os.environ`` equal to ``saved`` again (variables added since are removed)."""
    for name in [k for k in os.environ if k not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _run_dask(
    func: Callable[[Any], Any], items: Mapping[str, Any], config: ExecutorConfig
) -> Iterator[TaskOutcome]:
    """dask.distributed; this process's environment is the same afterwards.

    The nannies of an own LocalCluster run in this process and put dask's pre-spawn
    environment (``MALLOC_TRIM_THRESHOLD_=65536``, ``OMP_NUM_THREADS=1``, ...) into
    ``os.environ`` (distributed documents the leak), where every process started later would
    inherit it: worker processes of a later ``processes`` run then returned each freed array to
    the kernel and ran 1.0x instead of 1.6x sequential (``benchmarks/README.md``).
    """
    saved = dict(os.environ)
    try:
        yield from _run_dask_cluster(func, items, config)
    finally:
        _restore_environ(saved)


def _run_dask_cluster(
    func: Callable[[Any], Any], items: Mapping[str, Any], config: ExecutorConfig
) -> Iterator[TaskOutcome]:
    """dask.distributed, lazily fed: at most ``window`` futures in flight."""
    import dask
    from distributed import Client, LocalCluster, wait

    cluster = None
    if config.scheduler is None:
        env = {var: "1" for var in _THREAD_ENV}
        # The nannies hand this configuration to the worker processes they start.
        with dask.config.set(LOCAL_DASK_CONFIG):
            cluster = LocalCluster(
                n_workers=config.workers,
                threads_per_worker=config.threads_per_worker,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.WARNING,
                env=env,
            )
        client = Client(cluster)
    else:
        client = Client(config.scheduler)
    futures: dict[Any, str] = {}
    try:
        external = config.scheduler is not None

        def window() -> int:
            if not external:
                return 2 * config.workers * config.threads_per_worker
            # an external (possibly adaptive) cluster: keep every thread it has now busy
            return 2 * max(sum(client.nthreads().values()), config.max_parallel, 1)

        keys = iter(items)

        def top_up() -> None:
            for key in itertools.islice(keys, max(window() - len(futures), 0)):
                fut = client.submit(_call, func, key, items[key], 1, pure=False)
                futures[fut] = key

        top_up()
        no_workers_since: float | None = None
        while futures:
            try:
                done, _ = wait(list(futures), timeout=_DASK_POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            if not done:
                if client.nthreads():
                    no_workers_since = None
                    continue
                now = time.monotonic()
                if no_workers_since is None:
                    no_workers_since = now
                    if external:  # a batch cluster may still be waiting in the queue
                        log.warning("dask scheduler %s has no workers; waiting", config.scheduler)
                if not external and now - no_workers_since > DASK_NO_WORKER_TIMEOUT_S:
                    error = (
                        f"NoWorkers: the dask LocalCluster has had no workers for "
                        f"{DASK_NO_WORKER_TIMEOUT_S:.0f} s"
                    )
                    for fut, key in list(futures.items()):
                        fut.cancel()
                        yield _dask_failure(key, error)
                    futures.clear()
                    for key in keys:
                        yield _dask_failure(key, error)
                continue
            for fut in done:
                key = futures.pop(fut)
                try:
                    outcome = fut.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker, CancelledError, ...
                    outcome = _dask_failure(
                        key,
                        f"{type(exc).__name__}: the dask worker running this subject failed: {exc}",
                    )
                fut.release()
                yield outcome
            top_up()
    finally:
        for fut in list(futures):
            fut.cancel()
        client.close()
        if cluster is not None:
            cluster.close()


_RUNNERS = {"sequential": _run_sequential, "processes": _run_processes, "dask": _run_dask}


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def run_tasks(
    func: Callable[[T], R],
    items: Mapping[str, T],
    config: ExecutorConfig,
    *,
    desc: str = "",
    progress: bool = True,
) -> dict[str, TaskOutcome]:
    """Run ``func(item)`` for every item with the configured executor.

    Parameters
    ----------
    func : callable
        A picklable module-level function of one argument.  It should return something small
        (a row, a DataFrame of metrics), not image arrays.
    items : mapping of str to object
        ``{subject ID: argument}``; arguments must be picklable (paths, small tuples, ...).
    config : ExecutorConfig
        Which executor runs the items.
    desc : str
        Label of the progress bar.
    progress : bool
        Show a tqdm progress bar (``tqdm.auto``: a widget in Jupyter, text elsewhere).

    Returns
    -------
    dict of str to TaskOutcome
        One outcome per item, in the order of ``items``.  Failed items have ``ok=False`` and
        ``error="TypeName: message"`` (a stage tables them with
        :func:`helpers.runs.write_failures`).

    Raises
    ------
    TypeError
        When a key is not a string, or ``func`` cannot be sent to the workers (not picklable;
        for ``processes``, defined in a notebook or interactive session).
    KeyboardInterrupt, SystemExit
        Propagated (outstanding work is cancelled).
    """
    from tqdm.auto import tqdm

    if not isinstance(config, ExecutorConfig):
        msg = f"config must be an ExecutorConfig, got {type(config).__name__}"
        raise TypeError(msg)
    bad = [k for k in items if not isinstance(k, str)]
    if bad:
        msg = f"item keys must be subject IDs (str), got {bad[0]!r}"
        raise TypeError(msg)
    if not items:
        return {}
    if config.kind == "processes" and _defined_interactively(func):
        msg = (
            f"processes executor: {getattr(func, '__qualname__', func)!r} is defined in a "
            "notebook or an interactive session, which spawned worker processes cannot import; "
            "define it in a module (e.g. helpers), or use the sequential or dask executor"
        )
        raise TypeError(msg)
    if config.kind != "sequential":
        try:
            pickle.dumps(func)
        except Exception as exc:
            msg = (
                f"{config.kind} executor: {getattr(func, '__qualname__', func)!r} cannot be "
                f"sent to worker processes ({_format_error(exc)}); use a module-level function"
            )
            raise TypeError(msg) from exc

    if config.kind == "sequential":
        _tune_allocator_once()  # the subjects run in this process: same allocator as the workers
    results: dict[str, TaskOutcome] = {}
    n_failed = 0
    start = time.perf_counter()
    with tqdm(total=len(items), desc=desc or None, disable=not progress, unit="subj") as bar:
        for outcome in _RUNNERS[config.kind](func, items, config):
            results[outcome.key] = outcome
            if not outcome.ok:
                n_failed += 1
                log.warning("%s: subject %s failed: %s", desc or "task", outcome.key, outcome.error)
                bar.set_postfix(failed=n_failed, refresh=False)
            bar.update(1)
    log.info(
        "%s: %d subject(s) in %.1f s with the %s executor (%d failed)",
        desc or "task",
        len(items),
        time.perf_counter() - start,
        config.kind,
        n_failed,
    )
    return {key: results[key] for key in items}


def _defined_interactively(func: Callable[..., Any]) -> bool:
    """True for a function of ``__main__`` when ``__main__`` is not a file (Jupyter, REPL)."""
    if getattr(func, "__module__", None) != "__main__":
        return False
    main = sys.modules.get("__main__")
    return main is None or not getattr(main, "__file__", None)


def successful_values(outcomes: Mapping[str, TaskOutcome]) -> dict[str, Any]:
    """``{subject: value}`` of the items that succeeded, in input order."""
    return {k: o.value for k, o in outcomes.items() if o.ok}
