"""An S3-compatible object store for tests: a moto server on 127.0.0.1 with one empty bucket.

The ``s3_bucket`` fixture (tests/conftest.py) is the usual way in; :func:`moto_bucket` is the
context manager behind it. :class:`Bucket` also names a bucket of a moto server started elsewhere
(tests/test_multinode.py runs one inside a network namespace).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from ranks import free_port

BUCKET = "mlctl-test"
# moto accepts any credentials; boto3 and pyarrow refuse to sign without some.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Bucket:
    name: str
    port: int
    host: str = "127.0.0.1"

    def uri(self, prefix: str) -> str:
        """The location of ``prefix`` in the bucket, as mlctl's storage and the launcher take it."""
        query = f"endpoint_override={self.host}:{self.port}&scheme=http&region=us-east-1"
        return f"s3://{self.name}/{prefix}?{query}"

    def filesystem(self):
        """A pyarrow filesystem on the server (paths are ``bucket/key``), to look into it."""
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(self.uri(""))[0]


@contextmanager
def moto_bucket(bucket: str = BUCKET) -> Iterator[Bucket]:
    """A moto server with ``bucket`` created, while the block runs. The AWS credentials it needs are
    in ``os.environ`` meanwhile, so processes started in the block (DataLoader workers, an embedded
    Ray's workers) inherit them. Skips the test without moto's server (the dev extra)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for k, v in CREDENTIALS.items():
            env.setenv(k, v)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=bucket)
            yield Bucket(bucket, port)
        finally:
            server.stop()
