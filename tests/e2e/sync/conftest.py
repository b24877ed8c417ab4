"""The sync tests' S3 server (moto_server, once per session), for the end-to-end sync tests here."""

from tests.sync.conftest import bucket, s3_server  # noqa: F401 - fixtures
