"""Fail fast when an object store has no credentials, instead of asking the cloud's metadata service.

With no key, token or profile configured, obstore falls back to the instance-metadata address
(169.254.169.254 for S3 and Azure, the GCE metadata server for GCS) and retries there for
minutes before failing with a long traceback. Off a cloud VM that is never what the user meant,
so it happens only when asked for: `storage_options: {instance_credentials: true}` or
`DISTILCACHE_INSTANCE_CREDENTIALS=1`.
"""

from __future__ import annotations

import os

from pipeline.errors import CacheError

INSTANCE_OPTION = "instance_credentials"
INSTANCE_ENV = "DISTILCACHE_INSTANCE_CREDENTIALS"

_KINDS = {
    ("s3://", "s3a://"): (
        "aws",
        ("access_key_id", "web_identity_token_file", "container_credentials_relative_uri",
         "container_credentials_full_uri", "skip_signature"),
        ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
         "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_SKIP_SIGNATURE"),
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    ),
    ("gs://", "gcs://"): (
        "google",
        ("service_account", "service_account_path", "service_account_key", "application_credentials",
         "skip_signature"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH",
         "GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_SKIP_SIGNATURE"),
        "GOOGLE_APPLICATION_CREDENTIALS",
    ),
    ("az://", "azure://", "abfs://", "abfss://"): (
        "azure_storage",
        ("account_key", "access_key", "sas_key", "sas_token", "token", "bearer_token", "client_secret",
         "federated_token_file", "use_azure_cli", "use_emulator", "skip_signature"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_TOKEN",
         "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USE_AZURE_CLI", "AZURE_STORAGE_USE_EMULATOR"),
        "AZURE_STORAGE_ACCOUNT_KEY (or a SAS token)",
    ),
}  # fmt: skip


def check_credentials(url: str, options: dict) -> dict:
    """`options` without our own key; CacheError when `url` has no credentials and instance
    credentials were not asked for."""
    options = dict(options)
    instance = bool(options.pop(INSTANCE_OPTION, False)) or os.environ.get(INSTANCE_ENV, "") not in ("", "0")
    for schemes, (prefix, keys, env, hint) in _KINDS.items():
        if not url.startswith(schemes) or instance:
            continue
        given = {k.lower().removeprefix(f"{prefix}_").removeprefix("aws_") for k in options}
        if given & set(keys) or "credential_provider" in given or any(os.environ.get(v) for v in env):
            continue
        raise CacheError(
            f"{url}: no credentials for this object store; set {hint} (or storage_options with a key or "
            "`skip_signature: true` for a public bucket), or, on a cloud VM, ask for its instance credentials "
            f"with storage_options `{INSTANCE_OPTION}: true` or {INSTANCE_ENV}=1"
        )
    return options
