"""The project's exceptions. A user's mistake raises a subclass of `EndophenoError`; the CLI prints its
message as one line and exits 2, without a traceback."""


class EndophenoError(Exception):
    """Base class of every error a user can cause and fix."""


class InputError(EndophenoError):
    """One input (a file, a subject, a variant) is unusable. The message names it and says why; callers
    that process many inputs report it and carry on with the others."""

    def __init__(self, what: str, reason: str):
        self.what, self.reason = str(what), reason
        super().__init__(f"{what}: {reason}")
