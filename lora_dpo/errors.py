"""The two errors a user can fix: a bad recipe and bad data. The CLI turns both into exit code 2."""


class UserError(Exception):
    """An error in something the user supplied; its message is shown as is, without a traceback."""


class ConfigError(UserError):
    """A recipe key is unknown, missing, of the wrong type or out of range."""


class DataError(UserError):
    """A dataset cannot be loaded, has no recognised format, or holds malformed rows."""


def first_line(exc: BaseException) -> str:
    """'TypeName: first line of the message', for one-line errors that still say what failed."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
