"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

from typing import Any


class DskError(Exception):
    """Base error: a message a person can act on, and the exit code the CLI uses."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(DskError):
    """Bad user input (inventory, training config, option). Nothing was changed."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 hint: str | None = None):
        where = ""
        if file and field:
            where = f"{file}: {field}: "
        elif file:
            where = f"{file}: "
        elif field:
            where = f"{field}: "
        super().__init__(where + message, hint=hint)
        self.file = file
        self.field = field


class EnvironmentProblem(DskError):
    """The machine lacks something (a tool, root rights); says what to install or do."""

    exit_code = 3


class RunFailed(DskError):
    """A playbook, launch or check failed on some nodes; names them."""

    exit_code = 1

    def __init__(self, message: str, *, nodes: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.nodes = list(nodes or [])
        # The finished run's PlaybookResult, when a playbook ran to its end (runner.py).
        self.result: Any = None


class Interrupted(DskError):
    """A signal (SIGINT, SIGTERM, SIGHUP) ended the command after cleaning up; the exit
    code is the shell's for that signal, 128 + its number (130, 143, 129)."""

    def __init__(self, signum: int, message: str | None = None, *, hint: str | None = None):
        import signal

        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        self.exit_code = 128 + self.signum
        super().__init__(message or f"interrupted by {self.signal_name}", hint=hint)


class ClusterBusy(DskError):
    """Another run holds the cluster's lock; says who. Nothing was started."""

    exit_code = 75  # EX_TEMPFAIL: try again later
