"""The exceptions kmeshd raises on purpose; only kmeshd.cli maps them to exit codes.

KmeshdError
 ├── ConfigError        exit 78 (EX_CONFIG): bad config or inventory, or a path it
 │                      sets that is missing or unusable; carries every problem found
 └── UnavailableError   exit 69 (EX_UNAVAILABLE): the host cannot do what is needed
                        (no bcc, no kernel headers, no cgroup v2, address in use)
"""

from __future__ import annotations


class KmeshdError(Exception):
    """Base of every error kmeshd reports to its user."""


class ConfigError(KmeshdError):
    """Configuration problems, each a `file: key.path: problem` line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class UnavailableError(KmeshdError):
    """Something the host lacks; the message names what and how to fix it."""
