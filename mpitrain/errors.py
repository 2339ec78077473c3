"""The one exception a user sees: a one-line message naming the bad file, dataset, flag or value."""


class MpitrainError(Exception):
    """Bad input or configuration; the CLI prints it as `mpitrain: error: <message>` and exits 2."""
