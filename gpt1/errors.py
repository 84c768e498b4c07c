"""The one error type that the command-line entries print as a single line before exiting non-zero."""

import functools
import sys


class GPT1Error(Exception):
    """Bad input from the user: a path, a config, a flag or a file that cannot be used."""


def reason(e):
    """The first line of e's message that says what went wrong, for a one-line error: load_state_dict's message
    opens with a bare header ("Error(s) in loading state_dict for GPT1:") and gives the reasons on the lines after."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1]
    return lines[0] if lines else type(e).__name__


def cli_errors(main):
    """Turn GPT1Error (and the ValueError/OSError of bad input) into `error: ...` and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (GPT1Error, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
