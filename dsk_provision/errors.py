"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

import signal


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


def signal_exit_code(signum: int) -> int:
    """The exit code of a command stopped by signal ``signum``, as shells report it:
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + int(signum)


class Interrupted(DskError):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) stopped the run; what ran was stopped and the
    run directory says so. Exit code: 128 + the signal's number."""

    def __init__(self, message: str, *, signum: int = signal.SIGINT, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.signum = int(signum)
        self.exit_code = signal_exit_code(signum)


class ClusterBusy(DskError):
    """Another run holds the cluster's lock; says who. Nothing was started."""

    exit_code = 75  # EX_TEMPFAIL: try again later
