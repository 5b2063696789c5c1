"""Errors that qat_ste raises for bad input: each names the problem and the fix."""

from __future__ import annotations


class QatSteError(ValueError):
    """Bad input to qat_ste. The message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")
