"""Bad input and exit statuses: every script reports a problem the user can fix as one line and exits with 2.

    from pretrain.errors import InputError, run_main
    def main(): ...; raise InputError("--vocab_size must be at least 261; pass a larger value")
    if __name__ == "__main__": run_main(main)

Exit statuses of pre-training.py (listed in docs/distributed.md too): 0 done; 2 bad input, an output_dir that cannot be
written or cannot hold one checkpoint; 3 the loss kept diverging; 74 a checkpoint could not be written (disk
full, ...); 75 stopped by SIGTERM/SIGINT after saving a checkpoint: rerun with `resume_from_checkpoint: latest`.
A second signal ends the process at once by that signal (a shell shows 143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 74   # EX_IOERR in sysexits.h
EXIT_PREEMPTED = 75      # EX_TEMPFAIL in sysexits.h: try again later, which is what resuming does


class InputError(Exception):
    """A problem with what the user gave us: reported in one line, exit status 2, no traceback."""


def run_main(main) -> None:
    """Call `main()`, turning an InputError into a one-line message and exit status 2."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def first_line(error: BaseException) -> str:
    """The gist of a library's error for a one-line message: its first line, or its type when it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
