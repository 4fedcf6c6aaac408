"""Error types the CLI maps to exit codes: UserError -> 2 (one line, no traceback), JobError -> 1."""


class UserError(Exception):
    """Bad input the user can fix: the message is one line naming the key/value and what is valid."""


class JobError(Exception):
    """A job that started and failed (recorded in job.json; the sweep goes on)."""
