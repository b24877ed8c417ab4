"""The S3 target keeps the ObjectStore contract, on a real S3 server (moto_server)."""

from __future__ import annotations

from pathlib import Path

from .conftest import S3Server
from .contract import run_store_contract


def test_s3_store_keeps_the_contract(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    # A low multipart threshold, so the large file goes up in parts.
    store = s3_server.store(bucket, "backups/alice", multipart_threshold_bytes=8 << 20, multipart_chunk_bytes=5 << 20)
    run_store_contract(store, tmp_path)
    store.close()
