"""What docs/reliability.md guarantees and is not tested elsewhere: the training clock carried over a killed fit,
atomic writes leaving no partial file and giving outputs the umask's permissions, the RNG state round trip."""

import json
import os
import random
import stat
import time

import numpy as np
import pytest
import torch


def test_train_clock_sums_every_fit_of_a_run(tmp_path):
    from speechkd.training import TrainClock

    first = TrainClock(tmp_path, every=0.0)
    first.start()
    time.sleep(0.05)
    first.tick()  # every=0: written at once, as a long fit writes every 30 s
    killed = json.loads((tmp_path / "ckpt" / "clock.json").read_text())["seconds"]
    assert killed >= 0.05
    # the process dies here; the next fit of the run starts from what was written
    second = TrainClock(tmp_path)
    second.start()
    time.sleep(0.05)
    seconds, cpu = second.stop()
    assert seconds >= killed + 0.05 and seconds < killed + 5 and cpu >= 0
    assert json.loads((tmp_path / "ckpt" / "clock.json").read_text()) == {"seconds": seconds, "cpu_seconds": cpu}


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from speechkd.training import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "c.ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng"])  # no pickled numpy objects needed
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_writes_get_the_umask_permissions_and_leave_nothing_on_failure(tmp_path):
    from speechkd.utils import atomic_dir, atomic_path, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # not mkdtemp's 0700
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "b.txt") as tmp:
                tmp.write_text("half")
                raise RuntimeError("stopped")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]  # no b.txt, no temporary file
    finally:
        os.umask(old)


def test_label_files_get_the_umask_permissions(tmp_path):
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut

    from speechkd.labels.store import write_frame_labels

    cuts = CutSet.from_cuts([dummy_cut(0, duration=1.0)])
    old = os.umask(0o022)
    try:
        write_frame_labels(cuts, {cuts[0].id: np.zeros((100, 2), np.uint8)}, tmp_path, "ci", frame_shift=0.01)
    finally:
        os.umask(old)
    (h5,) = tmp_path.glob("*.h5")
    assert stat.S_IMODE(h5.stat().st_mode) == 0o644
