"""A real S3 API on loopback: moto's server, with its IAM checks on, so wrong credentials are refused."""

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect_servers import BIN, free_port, stop_process_group

# moto serves its first requests without checking credentials: the three that create our IAM user.
UNCHECKED_REQUESTS = 3
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


@dataclass
class ObjectStore:
    """A running moto server: the AWS settings that reach it with valid credentials, and its request log."""

    endpoint: str
    env: dict[str, str]
    log: Path

    def client(self, **settings: str):
        """A boto3 S3 client of this store (other credentials with `settings`)."""
        import boto3

        options = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
            "region_name": "us-east-1",
        }
        return boto3.client("s3", **{**options, **settings})

    def bucket(self, name: str) -> str:
        """Create a bucket; its URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in a bucket under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [found["Key"] for page in pages for found in page.get("Contents", [])]

    def requests(self) -> list[dict[str, str]]:
        """Every request the server answered so far: method, target and status."""
        return [match.groupdict() for match in REQUEST_LINE.finditer(self.log.read_text())]


@contextmanager
def moto_server(folder: Path, timeout: float = 60.0) -> Iterator[ObjectStore]:
    """Start moto's S3 server on a free port with an IAM user allowed everything; stop it afterwards."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = folder / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNCHECKED_REQUESTS), "TMPDIR": str(folder)}
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with log.open("w") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        iam = boto3.client(
            "iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        )
        iam.create_user(UserName="featuresum")
        iam.put_user_policy(UserName="featuresum", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName="featuresum")["AccessKey"]
        settings = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield ObjectStore(endpoint, settings, log)
    finally:
        stop_process_group(server)
