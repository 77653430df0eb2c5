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


def check_utf8(path, what: str, error: type[UserError] = UserError) -> None:
    """Refuse a text file that is not UTF-8, naming it (`what`) and the first bad byte's offset; read in blocks, so
    a large data file is never held whole. An unreadable file is refused the same way."""
    start, carry = 0, b""  # carry: a character split by a block's end, at byte `start` of the file
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                data = carry + block
                try:
                    data.decode("utf-8")
                    start, carry = start + len(data), b""
                except UnicodeDecodeError as exc:
                    if exc.reason == "unexpected end of data" and exc.end == len(data):
                        start, carry = start + exc.start, data[exc.start:]
                        continue
                    raise error(f"{what}: not UTF-8 text (byte {start + exc.start}: 0x{data[exc.start]:02x}); save "
                                "the file as UTF-8 and run again") from None
    except OSError as exc:
        raise error(f"{what}: cannot be read: {first_line(exc)}") from None
    if carry:
        raise error(f"{what}: not UTF-8 text (it ends inside a character at byte {start}); save the file as UTF-8")
