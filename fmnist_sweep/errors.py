"""The one exception type whose message is meant for the user, not a traceback."""


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class StorageLost(Exception):
    """The study storage connection was cut during a trial: not the trial's failure.
    Training stops (its MLflow run KILLED) and the study's worker reconnects and re-queues it."""
