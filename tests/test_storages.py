"""The storages for many workers, against real servers: Optuna's journal on the Redis server
of this machine (storage=redis) and Optuna's gRPC storage proxy in front of PostgreSQL
(storage=grpc, `storage-proxy`). Workers are killed with SIGKILL and the proxy is killed
and restarted; the tests assert exit codes and the study's trial states."""

import os
import signal
import threading
import time
import uuid

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tests.helpers import Forked, free_port, lr_sweep

REDIS_URL = os.environ.get("FMNIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
pytestmark = pytest.mark.slow


def start(args, env=None, out=None):
    """A worker (or proxy) process; its output lines collected in ``out``."""
    proc = Forked(args, env=env, merge=True)
    lines = out if out is not None else []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc


def wait_until(what, check, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            found = check()
        except Exception:  # the storage is being set up, or is restarting
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"never happened: {what}")


def kill_in_a_trial(args, trials, env=None, beside: list[str] = ()) -> int:
    """Start a worker, SIGKILL it while it trains a trial; that trial's number. ``beside``: the
    output of a server it depends on, shown with the worker's own if it never gets that far."""
    out = []
    victim = start(args, env, out)
    try:
        trial = wait_until("the first worker runs a trial", lambda: next(
            (t for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("process", "").endswith(
                f":{victim.pid}")), None))
    except AssertionError as e:
        raise AssertionError(f"{e}\nworker:\n{''.join(out[-20:])}\nbeside it:\n{''.join(beside[-20:])}") from None
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    return trial.number


def check_study(trials, n: int, killed: int) -> None:
    """The budget met, nothing RUNNING, the killed worker's trial failed and re-queued."""
    ts = trials()
    assert sum(t.state == TrialState.COMPLETE for t in ts) >= n
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    assert ts[killed].state == TrialState.FAIL
    assert killed in {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in ts}


def test_redis_journal_study_goes_on_past_a_killed_worker(tiny_overrides, workdir, tmp_path):
    import redis
    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    prefix = f"fmnist-test-{uuid.uuid4().hex[:8]}"
    storage = JournalStorage(JournalRedisBackend(REDIS_URL, prefix=prefix))
    args = [f"sweep={lr_sweep(tmp_path, 4)}", "storage=redis", f"storage.redis_url={REDIS_URL}",
            f"storage.prefix={prefix}", *tiny_overrides, "trainer.epochs=3"]
    try:
        killed = kill_in_a_trial(args, lambda: optuna.load_study(study_name="mine", storage=storage).trials)
        workers = [start(args) for _ in range(2)]  # the next workers on this host re-queue it at once
        assert [p.wait(300) for p in workers] == [0, 0]
        check_study(lambda: optuna.load_study(study_name="mine", storage=storage).trials, 4, killed)
    finally:
        server = redis.Redis.from_url(REDIS_URL)
        keys = list(server.scan_iter(f"{prefix}:*"))
        if keys:
            server.delete(*keys)


def test_grpc_proxy_study_goes_on_past_a_killed_worker_and_a_restarted_proxy(tiny_overrides, workdir, tmp_path,
                                                                            pg_database):
    port = free_port()
    env = dict(os.environ, FMNIST_STORAGE_URL=pg_database)
    proxy_args = ["storage-proxy", "--port", str(port), "storage=postgres"]
    # The schema made first: the proxy's storage and this one creating it at once collide in PostgreSQL.
    database = optuna.storages.RDBStorage(pg_database, engine_kwargs={"pool_pre_ping": True})
    proxy_out = []
    proxy = start(proxy_args, env, proxy_out)

    def trials():
        return optuna.load_study(study_name="mine", storage=database).trials

    # Pauses of 2..10 s outlast a restart. A trial the proxy's death cut off inside Optuna's ask has no
    # owner: the study's end waits storage.grace_period after it started (120 s by default), here 20 s.
    args = [f"sweep={lr_sweep(tmp_path, 8)}", "storage=grpc", f"storage.proxy.port={port}",
            "storage.retry_pause=2", "storage.grace_period=20", *tiny_overrides, "trainer.epochs=3"]
    try:
        killed = kill_in_a_trial(args, trials, beside=proxy_out)
        outputs = [[], []]
        workers = [start(args, out=out) for out in outputs]
        wait_until("two more trials complete", lambda: sum(t.state == TrialState.COMPLETE for t in trials()) >= 2)
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(30)
        time.sleep(2)
        proxy = start(proxy_args, env)  # the same port: the workers' channels reconnect
        codes = [p.wait(300) for p in workers]
        assert codes == [0, 0], "".join(outputs[0][-20:] + outputs[1][-20:])
        assert any("storage connection lost" in line for out in outputs for line in out)
        check_study(trials, 8, killed)
    finally:
        proxy.kill()
        proxy.wait(30)
