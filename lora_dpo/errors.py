"""The errors a user can fix (a bad recipe, bad data: exit code 2 in the CLI), and the safe stop (exit 130)."""


class UserError(Exception):
    """An error in something the user supplied; its message is shown as is, without a traceback."""


class ConfigError(UserError):
    """A recipe key is unknown, missing, of the wrong type or out of range."""


class DataError(UserError):
    """A dataset cannot be loaded, has no recognised format, or holds malformed rows."""


class Interrupted(Exception):
    """The run stopped on request after saving a checkpoint; the CLI exits 130."""


def first_line(exc: BaseException) -> str:
    """'TypeName: first line of the message', for one-line errors that still say what failed."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
