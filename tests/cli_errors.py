"""The shared check of a CLI refusal: exit status 2, one ``error:`` line naming the problem, no traceback."""

from __future__ import annotations


def one_line_error(capsys, code: int, pattern: str) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and pattern in errors[0], err
    return errors[0]
