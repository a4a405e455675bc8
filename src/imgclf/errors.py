"""The exceptions that end a command with one line for the user (UserError, Stopped), and the exit codes."""

import os
import re

EXIT_OK = 0
EXIT_PARTIAL = 1  # some inputs failed (predict), the others were handled
EXIT_USAGE = 2  # bad input: a flag, a path, a file, a data set
EXIT_DIVERGED = 3  # training stopped on a NaN or infinite loss
EXIT_DISTRIBUTED = 4  # another process of a distributed job failed
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """Something the user can fix. `str(err)` is one line that says what is wrong and what to do."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Stopped(Exception):
    """Training stopped early but resumably (a signal or --stop-after). `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def shown(path) -> str:
    """`path` (str, bytes or Path), or a message, as one printable line: bytes that are not UTF-8 as \\xNN, newlines and other
    control characters escaped, so that a hostile file name can neither break a message nor its encoding."""
    text = os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


# A line of a native library's message that only says where in its sources it was raised: OpenVINO's
# "Exception from src/inference/src/cpp/core.cpp:84:" (one per level it passed through), or its internal
# condition, "Check 'res.status == pugi::status_ok' failed at src/frontends/ir/src/input_model.cpp:219:".
_SOURCE_LOCATION = re.compile(r"^(Exception from|Check .* failed at) \S+\.(cpp|hpp|cc|c|h)(:\d+)+:?$")


def reason_of(err: BaseException, limit: int = 300) -> str:
    """`err`'s message as one printable line for the user: the lines that only name a library's source file
    and line left out (OpenVINO puts several before its reason) unless nothing else is said, the rest joined
    by spaces, escaped (`shown`) and cut at `limit` characters; the exception's type when it says nothing."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    told = [line for line in lines if not _SOURCE_LOCATION.match(line)] or lines
    text = shown(" ".join(told))
    return (text[: limit - 3] + "..." if len(text) > limit else text) or type(err).__name__


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of `err`'s message, escaped (`shown`) and cut at `limit`; its type when it says nothing."""
    text = str(err).strip().splitlines()
    return shown(text[0][:limit]) if text else type(err).__name__
