"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class DistilcacheError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class ConfigError(DistilcacheError):
    """Invalid configuration (unknown key, wrong type, inconsistent values)."""


class CacheError(DistilcacheError):
    """The cache is missing, incomplete, corrupt or belongs to another config."""


class CorpusError(DistilcacheError):
    """The corpus (or a task's files) cannot be read or yields no text."""


class TeacherError(DistilcacheError):
    """The teacher cannot be loaded or used as configured."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (or its type when it has no message), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
