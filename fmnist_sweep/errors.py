"""The one exception type whose message is meant for the user, not a traceback."""


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""
