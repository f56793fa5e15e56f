"""Workers started by hand on one machine (the same command in several terminals, a
scheduler placing several on a node) share its cores instead of drowning them: before each
trial a worker takes its share of the cores the machine's live workers leave free — a lock
file per core, held for the trial — pins itself to them and trains with that many threads,
so that workers x threads <= cores at any time; a worker finding none free waits for one.
Workers that `workers -n` starts (pinned already), a set trainer.threads and GPU workers
take no part."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

POLL = 0.2  # s between looks for a free core
FOLDER = "FMNIST_CORES_DIR"  # where the lock files are (default: a folder of this user's in the temp dir)


class CoreShare:
    """This process's place among the machine's workers: a lock file held for its life
    (``worker-PID.lock``), and the cores' lock files (``core-N.lock``) held during a trial."""

    def __init__(self, cores: list[int], name: str | None = None):
        self.cores = cores
        self.folder = Path(os.environ.get(FOLDER) or Path(tempfile.gettempdir()) / f"fmnist-sweep-{os.getuid()}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.me = open(self.folder / f"worker-{name or os.getpid()}.lock", "w")
        fcntl.flock(self.me, fcntl.LOCK_EX)
        self.held: list = []

    def others(self) -> int:
        """Live workers on this machine beside this one (a dead one's file is removed)."""
        n = 0
        for path in self.folder.glob("worker-*.lock"):
            if path.name == Path(self.me.name).name:
                continue
            with open(path, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    n += 1
                    continue
                path.unlink(missing_ok=True)  # its process is gone (a lock dies with its holder)
        return n

    def share(self) -> int:
        """Cores this worker takes for a trial: an equal share among the live workers, at least one."""
        return max(1, len(self.cores) // (1 + self.others()))

    def acquire(self) -> list[int]:
        """Lock up to share() free cores, waiting until one is free; the cores got."""
        want = self.share()
        while True:
            for core in self.cores:
                if len(self.held) == want:
                    break
                f = open(self.folder / f"core-{core}.lock", "w")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.held.append((core, f))
                except BlockingIOError:
                    f.close()
            if self.held:
                return [core for core, _ in self.held]
            time.sleep(POLL)

    def release(self) -> None:
        crowded = len(self.cores) < 1 + self.others()
        for _, f in self.held:
            f.close()  # closing the file drops its lock
        self.held = []
        if crowded:  # a worker waits for a core: give it the first look
            time.sleep(2 * POLL)

    @contextlib.contextmanager
    def trial(self):
        """Pinned to the cores got for the trial (its threads: trainer.threads=auto), then all again."""
        got = self.acquire()
        os.sched_setaffinity(0, got)
        try:
            yield got
        finally:
            self.release()
            os.sched_setaffinity(0, self.cores)


_SHARE: list[CoreShare] = []  # this process's one place among the workers (studies run one after another)


def for_worker(cfg, pinned: bool) -> CoreShare | None:
    """A hand-started CPU worker with trainer.threads=auto shares the machine's cores; it says
    so in one line when other workers are there. None for the others."""
    if pinned or str(cfg.trainer.threads) != "auto" or str(cfg.trainer.device).startswith("cuda"):
        return None
    import torch

    if cfg.trainer.device == "auto" and torch.cuda.is_available():
        return None
    if _SHARE:
        return _SHARE[0]
    share = CoreShare(sorted(os.sched_getaffinity(0)))
    _SHARE.append(share)
    if (others := share.others()):
        print(f"{others} other worker{'s' if others > 1 else ''} on this machine: this one takes "
              f"{share.share()} of its {len(share.cores)} cores per trial (waiting when none is free)", flush=True)
    return share
