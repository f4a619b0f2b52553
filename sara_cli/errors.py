"""The one user-facing exception. Only `cli.py` turns it into a message and an exit code."""


class SaraError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting.

    The message is one line that says what was received, what is allowed and what to do.
    """

    exit_code = 2
