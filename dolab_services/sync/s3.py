"""The S3 target: one bucket, one prefix per user, through boto3 (AWS or any S3-compatible store).

Credentials come only from the service's configuration (access key id and secret, or boto3's default chain in
the service's own environment), never from a user. Small objects go up in one ``PutObject``; files from
``multipart_threshold_bytes`` on go through boto3's managed transfer (multipart, parts of
``multipart_chunk_bytes``, a few parts at a time; a failed upload is aborted, so nothing partial is left).
Downloads stream the body to the file in 1 MiB pieces.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from .store import ObjectInfo, ObjectNotFound, StoreError, check_key

__all__ = ["S3Store"]

_MiB = 1 << 20


class S3Store:
    """An :class:`~.store.ObjectStore` under ``s3://bucket/prefix/``. boto3 clients are thread-safe: one is shared."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        max_connections: int = 16,
        multipart_threshold_bytes: int = 64 * _MiB,
        multipart_chunk_bytes: int = 16 * _MiB,
        timeout_seconds: float = 60,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 target needs a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=multipart_chunk_bytes,
            max_concurrency=4,
            use_threads=True,
        )
        if client is None:
            session = boto3.session.Session(
                aws_access_key_id=access_key_id or None,
                aws_secret_access_key=secret_access_key or None,
                aws_session_token=session_token or None,
                region_name=region_name or None,
            )
            client = session.client(
                "s3",
                endpoint_url=endpoint_url or None,
                config=botocore.config.Config(
                    max_pool_connections=max_connections,
                    connect_timeout=timeout_seconds,
                    read_timeout=timeout_seconds,
                    retries={"max_attempts": 5, "mode": "standard"},
                ),
            )
        self.client = client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, what: str, e: Exception) -> StoreError:
        code = ""
        if isinstance(e, botocore.exceptions.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return StoreError(f"The backup bucket {self.bucket} does not exist. Ask an administrator to create it.")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return StoreError(
                f"The backup store {self.description} refused access. Ask an administrator to check its credentials."
            )
        if isinstance(e, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
            return StoreError(f"The backup store {self.description} cannot be reached. Try again later.")
        return StoreError(
            f"The backup store {self.description} failed to {what} ({code or type(e).__name__}). Try again later."
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under the user's root whose key starts with ``prefix``."""
        root = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"][len(root) :], int(obj["Size"]))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("list backups", e) from e

    def put_file(self, key: str, path: Path) -> None:
        """Upload a file, in one request or multipart from ``multipart_threshold_bytes``."""
        full = self._key(key)
        try:
            if os.stat(path).st_size < self.multipart_threshold_bytes:
                with open(path, "rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=body)
            else:
                self.client.upload_file(str(path), self.bucket, full, Config=self._transfer)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("store a file", e) from e
        except boto3.exceptions.S3UploadFailedError as e:
            raise self._error("store a file", e.__cause__ or e) from e

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("store a backup manifest", e) from e

    def _get(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"{key} is not in the backup store {self.description}.") from None
            raise self._error("read a backup", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._error("read a backup", e) from e

    def get_file(self, key: str, path: Path) -> None:
        """Stream an object into ``path``."""
        body = self._get(key)
        try:
            with open(path, "wb") as out:
                for chunk in body.iter_chunks(_MiB):
                    out.write(chunk)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("read a backup", e) from e
        finally:
            body.close()

    def get_bytes(self, key: str) -> bytes:
        """A small object's content."""
        body = self._get(key)
        try:
            return bytes(body.read())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("read a backup", e) from e
        finally:
            body.close()

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects, 1,000 per request."""
        batch: list[dict[str, str]] = []
        for key in keys:
            batch.append({"Key": self._key(key)})
            if len(batch) == 1000:
                self._delete(batch)
                batch = []
        if batch:
            self._delete(batch)

    def _delete(self, batch: builtins.list[dict[str, str]]) -> None:
        try:
            reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("delete old backups", e) from e
        errors = [e for e in reply.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            raise StoreError(
                f"The backup store {self.description} did not delete {len(errors)} old object(s)"
                f" ({errors[0].get('Code')}). Try again later."
            )

    def close(self) -> None:
        """Close the client's connections."""
        close = getattr(self.client, "close", None)
        if callable(close):
            close()
