"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class DistilcacheError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class ConfigError(DistilcacheError):
    """Invalid configuration (unknown key, wrong type, inconsistent values)."""


class CacheError(DistilcacheError):
    """The cache is missing, incomplete, corrupt or belongs to another config."""
