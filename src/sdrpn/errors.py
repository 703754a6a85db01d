"""One exception type for problems a user can fix: the CLI prints its message as one line."""


class SdrpnError(ValueError):
    """Bad input or configuration; the message names the file/line/value and the reason.

    A `ValueError`, so code that already guards against bad values catches it too."""
