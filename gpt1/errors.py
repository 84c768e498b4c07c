"""The one error type that the command-line entries print as a single line before exiting non-zero."""

import functools
import sys


class GPT1Error(Exception):
    """Bad input from the user: a path, a config, a flag or a file that cannot be used."""


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
