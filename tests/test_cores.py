"""Workers started by hand on one machine share its cores: workers x threads <= cores."""

import os
import threading

from optuna.trial import TrialState

from fmnist_sweep.cores import CoreShare
from tests.helpers import Forked, lr_sweep, trials


def test_workers_take_an_equal_share_of_free_cores_and_wait_for_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_CORES_DIR", str(tmp_path / "locks"))
    a = CoreShare([0, 1], name="a")
    assert a.others() == 0 and a.share() == 2
    b, c = CoreShare([0, 1], name="b"), CoreShare([0, 1], name="c")
    assert a.others() == 2 and a.share() == 1  # three workers on two cores: one core each
    assert a.acquire() == [0] and b.acquire() == [1]
    got = []
    waiter = threading.Thread(target=lambda: got.append(c.acquire()))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not got  # no free core: the third waits
    a.release()
    waiter.join(5)
    assert got == [[0]]
    b.release(), c.release()
    b.me.close(), c.me.close()  # two workers exit: the one left takes both cores again
    assert a.others() == 0 and a.acquire() == [0, 1]


def test_three_hand_started_workers_finish_the_study_within_the_machines_cores(tiny_overrides, workdir, tmp_path):
    line = [f"sweep={lr_sweep(tmp_path, 4)}", *[o for o in tiny_overrides if not o.startswith("trainer.threads=")],
            "trainer.epochs=2"]
    env = dict(os.environ, FMNIST_CORES_DIR=str(tmp_path / "locks"))
    procs = [Forked(line, workdir, env, merge=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    cores = len(os.sched_getaffinity(0))
    beside = [o for o in outs if "on this machine: this one takes" in o]
    assert beside, outs  # the workers that started beside others said so
    done = [t for t in trials(workdir, "mine") if t.state == TrialState.COMPLETE]
    assert len(done) >= 4 and all(1 <= t.user_attrs["cores"] <= cores for t in done)
