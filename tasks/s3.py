"""S3-compatible object storage behind the storage package's `s3://bucket/key` locations.

Streams (Parquet reads and writes) go through pyarrow's S3FileSystem. What pyarrow has no answer for
goes through botocore: the ETag of the object a write created, and conditional writes (`If-Match`,
`If-None-Match`), which make read-modify-write of the registry and the monitoring history safe without
a lock that a killed run could leave behind. Both read the standard AWS settings (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, profiles), so MinIO, Ceph or AWS
work alike. boto3 and the filesystem are loaded on first use: a run on local folders never imports them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from featuresum.tasks.errors import InputError

if TYPE_CHECKING:
    import pyarrow.fs

SCHEME = "s3://"
# S3's bucket naming rules: 3-63 lower-case letters, digits, dots and hyphens, starting and ending alphanumeric.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# botocore's error codes of what the user fixes: a bucket, a key, credentials, permissions.
USER_CODES = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such object",
    "404": "no such object",
    "AccessDenied": "access denied: check the credentials and the bucket's policy",
    "403": "access denied: check the credentials and the bucket's policy",
    "InvalidAccessKeyId": "the access key is not known to the store: check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY",
    "InvalidBucketName": "not a valid bucket name",
}
# pyarrow's S3 errors carry the SDK's error name in their message.
ARROW_USER_ERRORS = {
    "NO_SUCH_BUCKET": "no such bucket",
    "ACCESS_DENIED": USER_CODES["AccessDenied"],
    "INVALID_ACCESS_KEY_ID": USER_CODES["InvalidAccessKeyId"],
    "SIGNATURE_DOES_NOT_MATCH": USER_CODES["SignatureDoesNotMatch"],
}
CONNECT_TIMEOUT_SECONDS = 10.0
# A server-side copy or the completion of a multipart upload of gigabytes can take minutes.
REQUEST_TIMEOUT_SECONDS = 300.0
SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE")


class Conflict(Exception):
    """A conditional write lost: the object changed (or appeared) since it was read."""


def is_uri(location: object) -> bool:
    """Whether a location is an `s3://` URI (a Path never is)."""
    return isinstance(location, str) and location.startswith(SCHEME)


def split(uri: str) -> tuple[str, str]:
    """(bucket, key) of an `s3://bucket/key` URI, normalised; InputError naming what is wrong with it."""
    bucket, _, key = uri.removeprefix(SCHEME).partition("/")
    if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise InputError(f"{uri}: not an S3 location: give s3://bucket/prefix with a valid bucket name")
    parts = [part for part in key.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise InputError(f"{uri}: an S3 key cannot hold '.' or '..' parts")
    return bucket, "/".join(parts)


def normalize(uri: str) -> str:
    """The URI with no empty parts or trailing slash."""
    bucket, key = split(uri)
    return f"{SCHEME}{bucket}/{key}" if key else f"{SCHEME}{bucket}"


def _settings() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in SETTINGS)


@cache
def _filesystem(settings: tuple[str | None, ...]) -> pyarrow.fs.S3FileSystem:
    from pyarrow import fs

    # The SDK's 3-s request timeout is shorter than a store may take to assemble a multipart upload of
    # gigabytes; a retried CompleteMultipartUpload then fails although the first one succeeded.
    return fs.S3FileSystem(
        endpoint_override=settings[0],
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        request_timeout=REQUEST_TIMEOUT_SECONDS,
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
    )


def filesystem() -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 filesystem, configured from the AWS settings of the environment."""
    return _filesystem(_settings())


@cache
def _client(settings: tuple[str | None, ...]) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise InputError("s3:// locations need boto3: pip install 'featuresum[s3]'") from None
    # Standard retries: throttling and connection errors only, with backoff; a 403 or 404 fails at once.
    config = Config(
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=REQUEST_TIMEOUT_SECONDS,
    )
    return boto3.session.Session().client("s3", config=config)


def client() -> Any:
    """botocore's S3 client, configured from the AWS settings of the environment."""
    return _client(_settings())


def path(uri: str) -> str:
    """The `bucket/key` path pyarrow's filesystem takes."""
    return "/".join(filter(None, split(uri)))


@contextmanager
def errors(uri: str) -> Iterator[None]:
    """Turn the store's answers that the user fixes (a bucket, a key, credentials) into InputErrors."""
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in USER_CODES:
            raise InputError(f"{uri}: {USER_CODES[code]}") from None
        raise
    except NoCredentialsError:
        raise InputError(f"{uri}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
    # Connection errors pass as they are: the tasks retry them (is_transient), the CLI reports them in a line.


def arrow_error(uri: str, error: OSError) -> Exception | None:
    """The InputError for one of pyarrow's S3 errors that the user fixes, else None."""
    text = str(error)
    for name, meaning in ARROW_USER_ERRORS.items():
        if name in text:
            return InputError(f"{uri}: {meaning}")
    return None


@contextmanager
def arrow_errors(location: object) -> Iterator[None]:
    """pyarrow's errors of the object store as featuresum's: a missing bucket or refused key is the user's."""
    try:
        yield
    except OSError as error:
        raise (arrow_error(str(location), error) or error) from None


def is_transient(error: BaseException) -> bool:
    """Whether an error of the store can heal by waiting: throttling, a slow or unreachable endpoint."""
    text = str(error)
    if any(name in text for name in ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE")):
        return True
    try:
        from botocore.exceptions import ClientError, ConnectionError
    except ImportError:
        return False
    if isinstance(error, ConnectionError):
        return True
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable")
    return False


def head(uri: str) -> dict[str, Any] | None:
    """Size and ETag of an object, or None when there is none."""
    bucket, key = split(uri)
    with errors(uri):
        try:
            answer = client().head_object(Bucket=bucket, Key=key)
        except client().exceptions.ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                return None
            raise
    return {"bytes": answer["ContentLength"], "etag": answer["ETag"]}


def get(uri: str) -> tuple[bytes, str] | None:
    """An object's content and ETag, or None when there is none."""
    bucket, key = split(uri)
    with errors(uri):
        try:
            answer = client().get_object(Bucket=bucket, Key=key)
        except client().exceptions.NoSuchKey:
            return None
        return answer["Body"].read(), answer["ETag"]


def put(uri: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
    """Write an object in one PUT (it appears whole or not at all); returns its ETag.

    With `if_match` (an ETag) or `if_absent` the write happens only if the object is still that one,
    or still absent; Conflict otherwise.
    """
    bucket, key = split(uri)
    conditions = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_absent else {}
    with errors(uri):
        try:
            return client().put_object(Bucket=bucket, Key=key, Body=data, **conditions)["ETag"]
        except client().exceptions.ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Conflict(uri) from None
            raise


def copy(source: str, target: str) -> str:
    """Copy an object within the store (the target appears whole, at once); returns the new object's ETag."""
    bucket, key = split(target)
    source_bucket, source_key = split(source)
    with errors(target):
        answer = client().copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key})
    return answer["CopyObjectResult"]["ETag"]


def delete(uri: str) -> None:
    """Delete an object; nothing happens when there is none."""
    bucket, key = split(uri)
    with errors(uri):
        client().delete_object(Bucket=bucket, Key=key)


def list_prefix(uri: str) -> Iterator[tuple[str, int]]:
    """(URI, size in bytes) of every object under `uri/`."""
    bucket, key = split(uri)
    with errors(uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/" if key else ""):
            for found in page.get("Contents", []):
                yield f"{SCHEME}{bucket}/{found['Key']}", found["Size"]


def delete_prefix(uri: str, older_than: float | None = None) -> None:
    """Delete every object under `uri/` (with `older_than`, those last written more than that many seconds ago)."""
    bucket, key = split(uri)
    with errors(uri):
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/")
        now = datetime.now(UTC)
        for page in pages:
            found = page.get("Contents", [])
            if older_than is not None:
                found = [item for item in found if (now - item["LastModified"]).total_seconds() > older_than]
            if objects := [{"Key": item["Key"]} for item in found]:
                client().delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def check_bucket(uri: str) -> None:
    """Fail in one line, before any run, when the bucket is missing or the credentials are refused."""
    bucket, _ = split(uri)
    with errors(uri):
        try:
            client().head_bucket(Bucket=bucket)
        except client().exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket"):
                raise InputError(f"{uri}: no such bucket {bucket!r}: create it first") from None
            if code == "403":
                # HEAD answers carry no error code: ask once more with a request whose answer names the cause.
                client().list_objects_v2(Bucket=bucket, MaxKeys=1)
            raise
