"""The one exception a user sees: a one-line message naming the bad file, dataset, flag or value."""


class MpitrainError(Exception):
    """Bad input or configuration; the CLI prints it as `mpitrain: error: <message>` and exits 2."""


def error_of(check, *args) -> MpitrainError | None:
    """Run a check and return its MpitrainError instead of raising, so ranks can agree on it first
    (see mpitrain.comm.agree)."""
    try:
        check(*args)
    except MpitrainError as exc:
        return exc
    return None
