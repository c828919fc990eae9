"""A real S3 server for the tests: versitygw (an S3 gateway over a local folder), started on loopback.

``bash scripts/setup_runners.sh`` builds it (``go install``, the version of ``runners/versions.env``) into
``$LPIPS_PIPE_RUNNERS_HOME/versitygw/<version>/versitygw``; without it the tests that need it skip with one
line. The session fixture :func:`s3_server` starts ``versitygw --access KEY --secret SECRET --port
127.0.0.1:PORT posix DATA_DIR`` on a free port, waits until it answers, makes the test bucket and stops it at
the end. Nothing is mocked: the job, Beam's S3 filesystem and boto3 talk HTTP to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from lpips_pipe.pipeline import runners

ACCESS_KEY = "lpipspipetest"
SECRET_KEY = "lpips-pipe-test-secret-key"
BUCKET = "lpips-test"
REGION = "us-east-1"


def versitygw_binary() -> Optional[Path]:
    """The versitygw the set-up built, or ``None``."""
    version = runners.versions().get("VERSITYGW_VERSION", "v1.8.0")
    path = runners.runners_home() / "versitygw" / version / "versitygw"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class S3Server:
    """A running versitygw: its endpoint and keys, the job's flags and the AWS environment that reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    data_dir: Path
    process: Optional[subprocess.Popen] = None

    def flags(self) -> list[str]:
        """Beam's S3 options for the job's command line."""
        return [f"--s3_endpoint_url={self.endpoint}", f"--s3_access_key_id={self.access_key}",
                f"--s3_secret_access_key={self.secret_key}", f"--s3_region_name={REGION}"]

    def env(self) -> dict[str, str]:
        """The standard AWS environment for the commands without Beam flags (and the job without them)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": REGION, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=REGION,
                                              aws_access_key_id=self.access_key,
                                              aws_secret_access_key=self.secret_key)

    def make_bucket(self, name: str) -> str:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return name

    def put(self, uri: str, data: bytes) -> str:
        bucket, key = split_uri(uri)
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
        return uri

    def get(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, uri: str) -> list[str]:
        """``s3://`` URIs of every object under the prefix ``uri``."""
        bucket, prefix = split_uri(uri)
        client, found, token = self.client(), [], None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = client.list_objects_v2(**kwargs)
            found += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(found)

    def answers(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # pylint: disable=broad-except  # not up yet
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def start(data_dir: Path, binary: Path, timeout: float = 30.0) -> S3Server:
    """Start versitygw over ``data_dir`` on a free loopback port; wait until it answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(data_dir.parent / "versitygw.log", "wb")  # noqa: SIM115  # kept open for the server's life
    process = subprocess.Popen([str(binary), "--access", ACCESS_KEY, "--secret", SECRET_KEY,
                                "--port", f"127.0.0.1:{port}", "posix", str(data_dir)],
                               stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, data_dir, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"versitygw exited with {process.returncode} (log: {data_dir.parent / 'versitygw.log'})")
        if server.answers():
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"versitygw did not answer on {server.endpoint} within {timeout:g} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """versitygw on loopback with the bucket :data:`BUCKET` (skips, in one line, when it is not built)."""
    binary = versitygw_binary()
    if binary is None:
        pytest.skip("versitygw is not built here (bash scripts/setup_runners.sh builds it)")
    pytest.importorskip("boto3", reason="apache-beam[aws] (boto3) is not installed")
    server = start(tmp_path_factory.mktemp("s3") / "data", binary)
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop()
