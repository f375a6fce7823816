"""S3 (and S3-compatible: SeaweedFS, MinIO, R2...) backend via obstore.

Configuration comes from explicit arguments first, then the standard AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL), so the same server binary works against AWS and a local test server.
Timeouts and retries are short on purpose: an outage must surface as `StoreUnavailable` (503) in
seconds, not after obstore's default three minutes of retries.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import obstore.store as obs_store

from .errors import InvalidName
from .stores import ObstoreBackend, validate_key

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config


def _first_env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class S3Store(ObstoreBackend):
    """`s3://bucket/prefix`; everything the registry writes lands under `prefix/`."""

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
        request_timeout_s: float = 300.0,
        max_retries: int = 2,
        retry_timeout_s: float = 5.0,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("s3", "s3a") or not parsed.netloc:
            raise InvalidName(f"S3 URL {url!r} must look like s3://bucket/optional/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        endpoint = endpoint or _first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
        region = region or _first_env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"
        access_key_id = access_key_id or _first_env("AWS_ACCESS_KEY_ID")
        secret_access_key = secret_access_key or _first_env("AWS_SECRET_ACCESS_KEY")
        session_token = session_token or _first_env("AWS_SESSION_TOKEN", "AWS_TOKEN")

        config: S3Config = {"region": region}
        if access_key_id and secret_access_key:
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
            if session_token:
                config["session_token"] = session_token
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=connect_timeout_s),
            "read_timeout": timedelta(seconds=read_timeout_s),  # detects a stalled transfer
            "timeout": timedelta(seconds=request_timeout_s),  # whole request: large blobs need time
        }
        shown_endpoint = "AWS"
        if endpoint:
            ep = urlparse(endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise InvalidName(f"S3 endpoint {endpoint!r} must look like http(s)://host:port")
            config["endpoint"] = endpoint
            # Non-AWS servers are addressed as endpoint/bucket/key, not bucket.endpoint/key.
            config["virtual_hosted_style_request"] = False
            # Plain http is only ever used when the operator wrote http:// (e.g. a loopback test server).
            client["allow_http"] = ep.scheme == "http"
            shown_endpoint = f"{ep.scheme}://{ep.hostname}" + (f":{ep.port}" if ep.port else "")
        retry: RetryConfig = {
            "max_retries": max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout_s),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1), "base": 2},
        }
        inner = obs_store.S3Store(
            self.bucket, prefix=self.prefix or None, config=config, client_options=client, retry_config=retry
        )
        self.endpoint = endpoint
        secrets = (secret_access_key or "", session_token or "", urlparse(endpoint).password or "" if endpoint else "")
        super().__init__(
            inner,
            f"s3://{self.bucket}/{self.prefix} at {shown_endpoint}",
            secrets=secrets,
            hint=f"check that the S3 endpoint {shown_endpoint} is reachable and bucket '{self.bucket}' exists",
            auth_hint="check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and bucket permissions",
        )
