"""Problems a user can fix, and the one place the scripts turn them into a message instead of a traceback."""
import sys


class ReportedError(Exception):
    """A problem whose message says what is wrong and what to do; a script prints the message alone."""


class InputError(ReportedError, ValueError):
    """Input that cannot be used: a missing or malformed file, a checkpoint that does not fit, contradicting flags."""


class Stopped(Exception):
    """A run stopped by SIGINT or SIGTERM after saving its state. A script exits with 128 + the signal's number, as
    the shell reports a process that signal ended (130 for Ctrl-C, 143 for SIGTERM), so a scheduler sees it stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


# What a user caused and can fix: ReportedErrors, and the file-system errors a script's own arguments cause (a
# mistyped path, a folder given for a file), whose messages name the path. Other OSErrors (a full disk, a dropped
# connection) keep their traceback.
USER_ERRORS = (ReportedError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def message_of(error: Exception) -> str:
    """The error's own message. One raised in a DataLoader worker is re-raised in the main process with the
    worker's whole traceback as its message, ending in '<module>.<class>: <the original message>'."""
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if "\nOriginal Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].rstrip()
    return text


def run_script(main):
    """Run a script's `main()`. A ReportedError or a bad path ends the script with 'error: <message>' on stderr
    and exit status 1, Ctrl-C with status 130 and no traceback, a training run stopped by a signal with its message
    and 128 + the signal's number; any other exception keeps its traceback."""
    try:
        main()
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_status)
    except USER_ERRORS as e:
        print(f"error: {message_of(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
