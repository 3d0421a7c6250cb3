"""speechkd.workers: jobs run in spawned processes, load their own batches, and a failed job names itself."""

import pytest

from speechkd.workers import Job, loader_workers, run_jobs


def _record_loader_workers(path: str) -> None:
    """A job: write what :func:`loader_workers` says in the worker process."""
    with open(path, "w") as f:
        f.write(str(loader_workers()))


def _fail() -> None:
    raise SystemExit(3)


def test_a_job_loads_its_own_batches_and_a_failed_job_is_named(tmp_path):
    assert loader_workers() == 1  # a fit in this process loads in a DataLoader worker
    paths = [tmp_path / f"job{i}.txt" for i in range(2)]
    run_jobs([Job(f"job{i}", _record_loader_workers, (str(p),)) for i, p in enumerate(paths)], max_jobs=2)
    assert [p.read_text() for p in paths] == ["0", "0"]
    with pytest.raises(RuntimeError, match=r"broken failed \(exit code 3"):
        run_jobs([Job("broken", _fail)], max_jobs=1)
