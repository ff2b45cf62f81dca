"""The one exception type the CLI turns into a single clear line."""


class SlimlmError(Exception):
    """A user-facing error: the message names the problem and the fix.

    Library code raises this for bad input (missing paths, unknown names,
    corrupt files, texts too short). The CLI prints ``error: <message>`` and
    exits non-zero; other exceptions are bugs and keep their traceback under
    ``--debug``.
    """
