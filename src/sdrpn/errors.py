"""One exception type for problems a user can fix: the CLI prints its message as one line."""


class SdrpnError(Exception):
    """Bad input or configuration; the message names the file/line/value and the reason."""
