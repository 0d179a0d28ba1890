"""What every entry point does with an error: the project's own errors (bad input, a damaged file,
a full disk, a folder it cannot write) become one line on stderr and exit code 2; anything else
is a bug, shown with its traceback and where to report it.

    if __name__ == "__main__":
        entry_point(main)
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

REPORT_BUGS_AT = "https://github.com/guided-concepts/guided-concepts/issues"
USAGE_ERROR = 2           # argparse's own code for bad arguments; ours for bad input too

# Where the project writes by default, and the setting that moves it (named in a permission error).
WRITE_SETTINGS = ("run.output_dir (--set run.output_dir=DIR) for runs, --out for generate/export/tune, "
                  "GUIDED_CONCEPTS_CACHE for generated data and models, HF_HOME for the hub cache")


class UserError(ValueError):
    """Bad input found by an entry point: the message is the whole story (one line)."""


def _project_errors() -> tuple[type[BaseException], ...]:
    # Imported late: this module must load before (and without) torch, for the cheapest entry.
    from guided_concepts.checkpointing import CheckpointError, RunFolderError
    from guided_concepts.configs.schema import ConfigError
    from guided_concepts.objectdata import DataError
    from guided_concepts.tokens import TokenError
    return UserError, ConfigError, DataError, CheckpointError, RunFolderError, TokenError


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the file it concerns, what went wrong, and how to get past it."""
    where = err.filename if err.filename is not None else "(unknown file)"
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        return f"{where}: no space left on the device; free space and run again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and what == os.strerror(err.errno):
        return f"{where}: {what}; move it with {WRITE_SETTINGS}"     # (our own messages say which setting)
    if err.errno == errno.ENAMETOOLONG:
        return f"{where}: name too long for the filesystem (at most {os.pathconf('/', 'PC_NAME_MAX')} bytes a name)"
    return f"{where}: {what}"


def entry_point(main: Callable[[], object]) -> None:
    """Run `main()` as a command: exit 0, 2 with one line for bad input, 128+N for a signal, 130
    for Ctrl-C outside the training loop, 1 with a traceback and a bug-report line for a bug."""
    try:
        main()
    except SystemExit as stop:
        if isinstance(stop.code, str):           # sys.exit("error: ...") anywhere in the project
            print(stop.code, file=sys.stderr)
            sys.exit(USAGE_ERROR)
        raise
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); nothing half-written is kept", file=sys.stderr)
        sys.exit(130)
    except _project_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except Exception:         # noqa: BLE001 - a bug: say so, with everything needed to fix it
        traceback.print_exc()
        print(f"\nThis is a bug in guided-concepts, not in your input. Please report it at {REPORT_BUGS_AT} "
              "with the command you ran and the traceback above.", file=sys.stderr)
        sys.exit(1)
