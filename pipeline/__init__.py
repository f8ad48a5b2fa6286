"""distilcache command-line interface and shared helpers (config, logging, errors)."""
