"""Training runs in worker processes, a few at a time: the one place that starts, watches and stops them.

On a CPU machine two one-thread runs finish sooner than the same runs one after the other with two threads, since
much of a small model's step is single-threaded work. ASR student runs (``Recipe.parallel_runs``, the ``distill``
stage) and SSL fine-tuning runs (``SslRecipe.parallel_runs``, the ``finetune`` stage) train this way.

Each job is a module-level function and its (picklable) arguments, run in a ``spawn``-ed, non-daemonic process.
A job loads its batches itself (:func:`loader_workers` is 0 there): it is one thread meant for one core, and a
DataLoader worker forked from it once aborted at the end of a fit ("terminate called without an active exception").
Stopping the parent (Ctrl-C, SIGTERM, even SIGKILL) stops the workers too; a failed job stops the others; every job
writes checkpoints, so re-running resumes them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from speechkd.utils import log

__all__ = ["Job", "loader_workers", "run_jobs"]

_IN_JOB = False  # set in a worker process by _job_main


@dataclass(frozen=True)
class Job:
    """One run for a worker process.

    Attributes:
      name: shown in the log and in the error of a failed job (e.g. ``mvq-seed1``, ``teacher-frozen-kws``).
      target: a module-level function (pickled by reference into the spawned process).
      args: its positional arguments (picklable: a recipe as JSON, names, seeds).
    """

    name: str
    target: Callable
    args: tuple = ()


def _exit_with_parent(parent_pid: int, poll_seconds: float = 2.0) -> None:
    """In a worker: end this process when its parent dies (even by SIGKILL), so no orphan keeps training."""
    import threading

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def loader_workers() -> int:
    """DataLoader workers of a training fit's training loader: 1 (a process loads and augments the next batches
    while the model trains), or 0 in a worker process of :func:`run_jobs` (the job's one thread loads them: the
    other cores already train the other jobs). The batches are the same either way: the samplers run in the
    training process and the augmentation is seeded per batch."""
    return 0 if _IN_JOB else 1


def _job_main(target: Callable, args: tuple, parent_pid: int) -> None:
    """Entry point of a worker process: watch the parent, then run the job."""
    global _IN_JOB
    _IN_JOB = True
    _exit_with_parent(parent_pid)
    target(*args)


def run_jobs(jobs: Sequence[Job], max_jobs: int, what: str = "runs", poll_seconds: float = 0.5) -> None:
    """Run ``jobs`` in worker processes, at most ``max_jobs`` at a time, in the order given.

    Args:
      jobs: the runs; their targets choose their own thread count (one each, by the callers' convention).
      max_jobs: processes at once (>= 1).
      what: what the jobs are, for the log line (``"student runs"``).
      poll_seconds: how often finished workers are looked for.

    Raises:
      RuntimeError: a job's process exited with a non-zero code (its error is on stderr above); the other
        workers are stopped first (SIGTERM, then SIGKILL after 30 s).
      KeyboardInterrupt: Ctrl-C or SIGTERM in the parent, after stopping the workers.
    """
    import multiprocessing as mp
    import signal
    import threading

    if max_jobs < 1:
        raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
    log(f"training {len(jobs)} {what}, {min(max_jobs, len(jobs))} at a time (one thread each)")

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers only live there
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    ctx = mp.get_context("spawn")
    queue, running = list(jobs), {}
    try:
        while queue or running:
            while queue and len(running) < max_jobs:
                job = queue.pop(0)
                proc = ctx.Process(target=_job_main, args=(job.target, job.args, os.getpid()), name=job.name)
                proc.start()
                running[proc] = job
            time.sleep(poll_seconds)
            for proc in [p for p in running if not p.is_alive()]:
                job = running.pop(proc)
                if proc.exitcode != 0:
                    raise RuntimeError(f"{job.name} failed (exit code {proc.exitcode}; its error is printed above); "
                                       "re-run to resume the other runs")
                log(f"{job.name} done")
    except BaseException:
        for proc in running:  # stop the other runs; their checkpoints let a re-run resume
            proc.terminate()  # Lightning stops a run at its next step on SIGTERM
        for proc in running:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
