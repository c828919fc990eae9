"""The one path abstraction: local paths and URIs of any Beam filesystem (``s3://``, ``gs://``, ...).

Every "is this path local?" question in the project is :func:`is_local`; every join, match, open, exists,
folder, delete, move and size goes through the functions here. A local path (no scheme) is served by
``os`` directly (fast, exactly as before); anything else by Beam's ``FileSystems``. Object stores have no
folders: a "folder" there is a key prefix, so :func:`isdir`, :func:`exists` (files or folders),
:func:`list_files` and :func:`delete` treat ``prefix/...`` keys as the folder's contents and :func:`mkdirs`
makes nothing.

**Options.** Beam's filesystems take their credentials and endpoints from the pipeline options handed to
``FileSystems.set_options``. :func:`configure` does that once per process (the job at planning, with its
parsed options; the other commands from the environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, and
Google's application default credentials). Workers of a Beam runner get the job's options from Beam itself
(``beam.Pipeline`` sets them in the launcher's process, Beam's SDK harness in a worker process).

**One S3 client per process.** Beam's ``S3FileSystem`` builds a new ``S3IO``, hence a new boto3 client (a
botocore session loading its service models: tens of milliseconds of CPU), for every call. Importing this
module makes Beam's S3 wrapper reuse one boto3 client per distinct set of options and environment (boto3
clients are thread-safe; the wrapper's own per-download state stays per call), with bounded connect/read
timeouts and retries (:data:`S3_CONNECT_TIMEOUT_S`, ...), and an endpoint that cannot be reached is not
retried for minutes by Beam's own back-off (:func:`_install_s3_client_cache`). The count of S3 requests this
process made is :func:`s3_requests` (the benchmark and the docs' figures use it).

Only the standard library and Beam are imported; nothing of ours but :mod:`transforms.messages`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
from typing import Any, BinaryIO, Optional, Sequence

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms.messages import one_line

_LOGGER = logging.getLogger("lpips_pipe.paths")
_SCHEME = re.compile(r"^(?P<scheme>[a-zA-Z][-a-zA-Z0-9+.]*)://")  # Beam's FileSystems.URI_SCHEMA_PATTERN
_GLOB_CHARS = "*?["
UNCOMPRESSED = CompressionTypes.UNCOMPRESSED

# boto3's client for Beam's S3 filesystem: an endpoint that does not answer fails in bounded time.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 60.0
S3_MAX_ATTEMPTS = 3  # botocore's "standard" retry mode: throttling, 5xx and connection errors, with back-off
S3_MAX_POOL_CONNECTIONS = 32
# The HTTP status Beam's S3 wrapper is given for "no answer at all" (no connection, a timeout after boto3's
# own retries): not 404 (which means "no such object") and not >= 500 (which Beam retries for ~10 minutes).
UNREACHABLE_STATUS = 0
_DEFERRED_UPLOAD = "lpips-pipe-deferred-upload"

# Environment variables that fill Beam's S3 options when no --s3_* flag gave them (boto3 reads the
# credentials itself; AWS_REGION is not read by boto3, the endpoint variables only by newer botocore).
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE") + _REGION_ENV + _ENDPOINT_ENV


# --------------------------------------------------------------------------- names


def scheme(path: str) -> Optional[str]:
    """The scheme of ``scheme://...`` (as Beam's ``FileSystems`` reads it), or ``None`` for a local path."""
    found = _SCHEME.match(path.strip()) if isinstance(path, str) else None
    return found.group("scheme").lower() if found else None


def is_local(path: str) -> bool:
    """Whether ``path`` is a plain local path (no ``scheme://``): served by ``os``, not by ``FileSystems``."""
    return scheme(path) is None


def join(base: str, *parts: str) -> str:
    """``base`` joined with ``parts`` (``os.path.join`` locally, ``/`` for URIs)."""
    return os.path.join(base, *parts) if is_local(base) else FileSystems.join(base, *parts)


def split(path: str) -> tuple[str, str]:
    """``(folder, name)`` of ``path`` (``os.path.split`` locally; the last ``/`` of a URI's key)."""
    if is_local(path):
        return os.path.split(path)
    prefix, _, rest = path.partition("://")
    folder, _, name = rest.rstrip("/").rpartition("/")
    return (f"{prefix}://{folder}" if folder else f"{prefix}://{rest.rstrip('/')}"), (name if folder else "")


def dirname(path: str) -> str:
    return split(path)[0]


def basename(path: str) -> str:
    return split(path)[1]


def absolute(path: str) -> str:
    """A local path made absolute (workers may run elsewhere than the launcher's directory); URIs as they are."""
    return os.path.abspath(path) if is_local(path) else path


def escape_glob(path: str) -> str:
    """``path`` as a match pattern that matches only itself (``[``, ``*``, ``?`` taken literally)."""
    return glob.escape(path)


def has_glob(pattern: str) -> bool:
    return any(char in pattern for char in _GLOB_CHARS)


def _under(folder: str) -> str:
    return folder.rstrip("/") + "/"


# --------------------------------------------------------------------------- questions


def match(pattern: str) -> list[str]:
    """Files matching ``pattern`` (a path or glob, any filesystem), sorted. A path that exists as it is
    written is taken literally, even when it holds glob characters (``a[1].parquet``)."""
    if has_glob(pattern) and is_file(pattern):
        return [pattern]
    return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)


def is_file(path: str) -> bool:
    """Whether ``path`` names an existing file (locally: anything that exists, as ``os.path.exists``)."""
    if is_local(path):
        return os.path.exists(path)
    return FileSystems.exists(path)


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder: locally a directory; on an object store a prefix with objects under it."""
    if is_local(path):
        return os.path.isdir(path)
    return bool(_list_under(path, limit=1))


def exists(path: str) -> bool:
    """Whether ``path`` is an existing file or folder (object stores: an object, or objects under ``path/``)."""
    if is_local(path):
        return os.path.exists(path)
    return FileSystems.exists(path) or isdir(path)


def _list_under(folder: str, limit: Optional[int] = None) -> list[str]:
    pattern = join(escape_glob(folder.rstrip("/")), "**")
    result = FileSystems.match([pattern], limits=[limit] if limit else None)[0]
    return sorted(meta.path for meta in result.metadata_list)


def list_files(folder: str) -> list[str]:
    """Every file under ``folder``, at any depth, sorted (none when it does not exist)."""
    if is_local(folder):
        if not os.path.isdir(folder):
            return []
        return sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names)
    return _list_under(folder)


def size(path: str) -> int:
    """The size of a file in bytes."""
    if is_local(path):
        return os.path.getsize(path)
    return FileSystems.get_filesystem(path).size(path)


# --------------------------------------------------------------------------- reading and writing


def open_read(path: str) -> BinaryIO:
    """``path`` opened for reading bytes (no decompression)."""
    if is_local(path):
        return open(path, "rb")  # noqa: SIM115  # the caller closes it
    return FileSystems.open(path, compression_type=UNCOMPRESSED)


def open_write(path: str) -> BinaryIO:
    """``path`` opened for writing bytes (its local folder made first; on an object store the object appears
    whole when the handle is closed)."""
    if is_local(path):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return open(path, "wb")  # noqa: SIM115
    return FileSystems.create(path, compression_type=UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_read(path) as handle:
        return handle.read()


def write_bytes(path: str, data: bytes) -> None:
    with open_write(path) as handle:
        handle.write(data)


def mkdirs(folder: str) -> None:
    """Make ``folder`` (and its parents) unless it exists; one made meanwhile by another writer is fine. Object
    stores have no folders: nothing is made there."""
    if is_local(folder):
        os.makedirs(folder, exist_ok=True)
        return
    try:
        FileSystems.mkdirs(folder)
    except (OSError, BeamIOError):  # made meanwhile by another writer (filesystems that have folders)
        if not exists(folder):
            raise


def delete(paths: Sequence[str]) -> None:
    """Delete files or folders (recursively), given literally (glob characters in them are not a pattern);
    what does not exist is skipped."""
    remote: list[str] = []
    for path in paths:
        if not is_local(path):
            remote.append(path)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    objects: list[str] = []
    for path in remote:
        under = _under(path)
        objects += [found for found in _list_under_prefix(path) if found == path or found.startswith(under)]
    if objects:
        FileSystems.delete(sorted(set(objects)))


def _list_under_prefix(path: str) -> list[str]:
    """Objects whose key starts with ``path``'s (one listing for ``path`` itself and ``path/...``)."""
    result = FileSystems.match([escape_glob(path.rstrip("/")) + "**"])[0]
    return [meta.path for meta in result.metadata_list]


def rename(sources: Sequence[str], destinations: Sequence[str]) -> None:
    """Move files (``os.replace`` locally, replacing a destination; an object store's copy-and-delete,
    whose copy replaces a destination whole)."""
    local = [(source, destination) for source, destination in zip(sources, destinations) if is_local(source)]
    for source, destination in local:
        os.replace(source, destination)
    remote = [(source, destination) for source, destination in zip(sources, destinations) if not is_local(source)]
    if remote:
        FileSystems.rename([source for source, _ in remote], [destination for _, destination in remote])


def move(source: str, destination: str) -> None:
    rename([source], [destination])


# --------------------------------------------------------------------------- options


def options_from_environment(options: Any = None) -> Any:
    """``options`` (Beam ``PipelineOptions``; new ones when ``None``) with Beam's S3 options that no flag gave
    filled from the standard AWS environment: region (``AWS_REGION``, ``AWS_DEFAULT_REGION``) and endpoint
    (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``). Credentials are left to boto3, which reads
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` (and profiles) itself, so they never
    enter the pipeline's options; GCS takes Google's application default credentials."""
    from apache_beam.options.pipeline_options import PipelineOptions, S3Options

    if options is None:
        options = PipelineOptions([])
    s3 = options.view_as(S3Options)
    if not s3.s3_region_name:
        s3.s3_region_name = next((os.environ[name] for name in _REGION_ENV if os.environ.get(name)), None)
    if not s3.s3_endpoint_url:
        s3.s3_endpoint_url = next((os.environ[name] for name in _ENDPOINT_ENV if os.environ.get(name)), None)
    return options


def configure(options: Any = None) -> Any:
    """Hand ``options`` (the job's parsed ``PipelineOptions``; ``None``: from the environment, for the
    commands without Beam flags) to ``FileSystems.set_options``, after :func:`options_from_environment`.
    Every later ``FileSystems`` call of this process uses them. Returns the options."""
    options = options_from_environment(options)
    FileSystems.set_options(options)
    return options


def describe_error(error: BaseException) -> str:
    """What went wrong, for a one-line message: Beam's ``BeamIOError`` (``op failed with exceptions {path:
    error}``) as its innermost error's text (one line, at most 300 characters); any other error's text as it
    is (its type's name when it has none)."""
    if isinstance(getattr(error, "message", None), str) and hasattr(error, "code"):  # Beam's S3ClientError
        return one_line(error.message, 300) or type(error).__name__
    inner = getattr(error, "exception_details", None)
    if isinstance(inner, dict) and inner:
        first = next(iter(inner.values()))
        text = describe_error(first) if isinstance(first, BaseException) else str(first)
        return one_line(text, 300) or type(error).__name__
    return str(error) or type(error).__name__


# --------------------------------------------------------------------------- Beam's S3 client, once per process

_S3_LOCK = threading.Lock()
_S3_CLIENTS: dict[tuple, Any] = {}
_S3_REQUESTS = [0]
_S3_REQUEST_HOOKS: list = []


def s3_requests() -> int:
    """S3 requests this process has sent (every attempt) through Beam's S3 filesystem."""
    return _S3_REQUESTS[0]


def add_s3_request_hook(hook: Any) -> None:
    """Call ``hook(operation, url)`` for every S3 request this process sends from now on (every attempt;
    ``operation`` is S3's name for it, e.g. ``PutObject``): the benchmark counts requests per kind of file."""
    _S3_REQUEST_HOOKS.append(hook)


def _count_request(event_name: str = "", request: Any = None, **_: Any) -> None:
    _S3_REQUESTS[0] += 1
    for hook in _S3_REQUEST_HOOKS:
        hook(event_name.rsplit(".", 1)[-1], getattr(request, "url", ""))


def _s3_settings(options: Any) -> dict:
    from apache_beam.options.pipeline_options import PipelineOptions, S3Options

    names = ("s3_access_key_id", "s3_secret_access_key", "s3_session_token", "s3_endpoint_url", "s3_region_name",
             "s3_api_version", "s3_verify", "s3_disable_ssl")
    if isinstance(options, PipelineOptions):
        view = options.view_as(S3Options)
        values = {name: getattr(view, name, None) for name in names}
    else:
        values = {name: (options or {}).get(name) for name in names}
    if not values["s3_region_name"]:  # the environment, for options that were not filled by configure
        values["s3_region_name"] = next((os.environ[name] for name in _REGION_ENV if os.environ.get(name)), None)
    if not values["s3_endpoint_url"]:
        values["s3_endpoint_url"] = next((os.environ[name] for name in _ENDPOINT_ENV if os.environ.get(name)), None)
    return values


class _Unreachable:
    """A boto3 client whose calls, when the endpoint cannot be reached at all (after boto3's own bounded
    retries), raise an error carrying :data:`UNREACHABLE_STATUS`, so Beam's wrapper does not retry it with
    its back-off of minutes."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            from botocore.exceptions import ConnectionError as BotoConnectionError
            from botocore.exceptions import HTTPClientError

            try:
                return attribute(*args, **kwargs)
            except (BotoConnectionError, HTTPClientError) as error:
                if not hasattr(error, "response"):
                    error.response = {"ResponseMetadata": {"HTTPStatusCode": UNREACHABLE_STATUS}}
                raise

        return call


def _shared_boto3_client(options: Any) -> Any:
    values = _s3_settings(options)
    key = tuple(sorted(values.items(), key=lambda item: item[0])) + tuple(os.environ.get(name) for name in _CLIENT_ENV)
    with _S3_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                            max_pool_connections=S3_MAX_POOL_CONNECTIONS)
            raw = boto3.session.Session().client(
                service_name="s3", region_name=values["s3_region_name"], api_version=values["s3_api_version"],
                use_ssl=not values["s3_disable_ssl"], verify=values["s3_verify"],
                endpoint_url=values["s3_endpoint_url"], aws_access_key_id=values["s3_access_key_id"],
                aws_secret_access_key=values["s3_secret_access_key"],
                aws_session_token=values["s3_session_token"], config=config)
            raw.meta.events.register("before-send.s3", _count_request)
            client = _S3_CLIENTS[key] = _Unreachable(raw)
        return client


def _install_s3_client_cache() -> None:
    """Make Beam's S3 wrapper (``boto3_client.Client``, built by every ``S3IO(options=...)``) reuse the
    process's shared boto3 client for its options. One class swapped in Beam's module, once; the per-call
    object keeps only its download position. Without ``apache-beam[aws]`` nothing happens."""
    try:
        from apache_beam.io.aws.clients.s3 import boto3_client
    except ImportError:
        return
    if boto3_client.boto3 is None or getattr(boto3_client.Client, "_lpips_pipe_shared", False):
        return
    original = boto3_client.Client

    from apache_beam.io.aws.clients.s3 import messages

    class SharedClient(original):  # type: ignore[misc, valid-type]
        """Beam's boto3 wrapper over the process's shared client for these options. Beam's uploader (one
        wrapper each) always makes a multipart upload (3 requests for any object); here an object written in
        one part (under 5 MB: ledger records, staged and published files, tiles) is one ``PutObject`` when
        it is closed, and the multipart upload starts only when a second part comes."""

        _lpips_pipe_shared = True

        def __init__(self, options: Any) -> None:  # pylint: disable=super-init-not-called
            self.client = _shared_boto3_client(options)
            self._download_request = None
            self._download_stream = None
            self._download_pos = 0
            self._upload: Optional[dict] = None

        def create_multipart_upload(self, request: Any) -> Any:
            self._upload = {"request": request, "held": None, "real": None, "etags": {}}
            return messages.UploadResponse(_DEFERRED_UPLOAD)

        def upload_part(self, request: Any) -> Any:
            upload = self._upload
            if upload is None or request.upload_id != _DEFERRED_UPLOAD:
                return super().upload_part(request)
            if upload.get("error") is not None:  # a close that failed, tried again: the same error
                raise upload["error"]
            if upload["real"] is None and upload["held"] is None and request.part_number == 1:
                upload["held"] = request
                return messages.UploadPartResponse(_DEFERRED_UPLOAD, 1)
            if upload["real"] is None:  # a second part: the real multipart upload, with the held first part
                upload["real"] = super().create_multipart_upload(upload["request"]).upload_id
                if upload["held"] is not None:
                    self._send_part(upload, upload["held"])
            return self._send_part(upload, request)

        def _send_part(self, upload: dict, request: Any) -> Any:
            request.upload_id = upload["real"]
            response = super().upload_part(request)
            upload["etags"][request.part_number] = response.etag
            return response

        def complete_multipart_upload(self, request: Any) -> None:
            upload = self._upload
            if upload is None or request.upload_id != _DEFERRED_UPLOAD:
                return super().complete_multipart_upload(request)
            if upload.get("error") is not None:
                raise upload["error"]
            if upload["real"] is not None:
                request.upload_id = upload["real"]
                request.parts = [{"ETag": etag, "PartNumber": number}
                                 for number, etag in sorted(upload["etags"].items())]
                return super().complete_multipart_upload(request)
            held = upload["held"]
            try:
                self.client.put_object(Bucket=request.bucket, Key=request.object,
                                       Body=held.bytes if held is not None else b"",
                                       ContentType=upload["request"].mime_type)
            except Exception as error:  # as Beam's wrapper words every boto3 error
                upload["error"] = messages.S3ClientError(str(error), boto3_client.get_http_error_code(error))
                raise upload["error"] from error
            return None

    boto3_client.Client = SharedClient


class _QuietBeamS3(logging.Filter):
    """Beam's S3 module logs ``HTTP error while requesting file ...: 3`` on the root logger for every failed
    request, beside the error it raises (which the commands turn into one line, or an error row): dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("aws", "s3io.py"))
                    and str(record.msg).startswith("HTTP error while"))


# --------------------------------------------------------------------------- Beam's GCS client, once per process

# gs:// (apache-beam[gcp]) bounded in time like S3. Beam as it is, with no route to Google: ~40 s finding
# credentials (google.auth.default tried 5 times with back-off, each pinging the GCE metadata server), then
# google-api-core's retry of every connection error for 120 s, per call: one image row hangs a job for minutes.
GCS_CONNECT_TIMEOUT_S = 5.0
GCS_READ_TIMEOUT_S = 60.0
GCS_CONNECT_ATTEMPTS = 3  # a connection that cannot be made: tried this many times, then unreachable
GCS_RETRY_DEADLINE_S = 60.0  # google-api-core's retry of answers that say "again" (429, 5xx): at most this long
_GCS_CLIENTS: dict[tuple, Any] = {}


class StoreUnreachableError(OSError):
    """An object store that gives no answer at all (no route, no name, nothing listening, no answer within the
    timeouts), after this module's own bounded attempts; not retried again by the filesystem's back-off."""


def _gcs_settings_key(options: Any) -> tuple:
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

    if isinstance(options, dict):
        options = PipelineOptions.from_dictionary(options)
    if not isinstance(options, PipelineOptions):
        options = PipelineOptions([])
    view = options.view_as(GoogleCloudOptions)
    names = ("project", "impersonate_service_account", "gcp_oauth_scopes", "job_name", "gcs_custom_audit_entries")
    values = tuple(repr(getattr(view, name, None)) for name in names)
    return values + tuple(os.environ.get(name) for name in ("GOOGLE_APPLICATION_CREDENTIALS",
                                                               "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CONFIG"))


def _bounded_session(session: Any) -> Any:
    """``session`` (the storage client's ``AuthorizedSession``) with every request's timeouts capped and a
    connection that cannot be made tried :data:`GCS_CONNECT_ATTEMPTS` times, then :class:`StoreUnreachableError`
    (which google-api-core's retry does not retry)."""
    import time

    import requests

    original = session.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")
        read = timeout[1] if isinstance(timeout, tuple) else timeout
        kwargs["timeout"] = (GCS_CONNECT_TIMEOUT_S, min(read or GCS_READ_TIMEOUT_S, GCS_READ_TIMEOUT_S))
        replayable = kwargs.get("data") is None or isinstance(kwargs.get("data"), (bytes, str))
        for attempt in range(GCS_CONNECT_ATTEMPTS):
            try:
                return original(method, url, *args, **kwargs)
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
                last = error
                if not replayable or (isinstance(error, requests.exceptions.ReadTimeout)):
                    break
                time.sleep(0.5 * 2 ** attempt)
        host = url.split("://", 1)[-1].split("/", 1)[0]
        raise StoreUnreachableError(f"{host} cannot be reached ({type(last).__name__}: "
                                    f"{one_line(str(last), 160)})") from last

    session.request = request
    return session


def _install_gcs_client_cache() -> None:
    """Beam's GCS filesystem (``apache-beam[gcp]``) in bounded time, with one storage client per process and
    set of options (Beam's ``GCSFileSystem`` builds a ``GcsIO``, hence a storage client and an HTTP session, for
    every call): credentials are looked up once, without Beam's 5 tries with back-off (``google.auth`` pings the
    metadata server with its own short timeouts; none found: anonymous, as Beam does); the client's requests
    get :data:`GCS_CONNECT_TIMEOUT_S`/:data:`GCS_READ_TIMEOUT_S` and :func:`_bounded_session`; google-api-core's
    retry of 429/5xx answers stops after :data:`GCS_RETRY_DEADLINE_S` (120 s by default). Without
    ``apache-beam[gcp]`` nothing happens (a ``gs://`` path is then an error naming the package)."""
    try:
        from apache_beam.internal.gcp import auth
        from apache_beam.io.gcp import gcsio, gcsio_retry
    except ImportError:
        return
    if getattr(gcsio, "_lpips_pipe_shared", False):
        return
    original_client, original_retry = gcsio.create_storage_client, gcsio_retry.get_retry

    def credentials_once(pipeline_options: Any) -> Any:  # Beam retries this 4 times with back-off
        import google.auth
        from apache_beam.options.pipeline_options import GoogleCloudOptions

        return google.auth.default(scopes=pipeline_options.view_as(GoogleCloudOptions).gcp_oauth_scopes)[0]

    def create_storage_client(pipeline_options: Any, use_credentials: bool = True) -> Any:
        key = (use_credentials,) + _gcs_settings_key(pipeline_options)
        with _S3_LOCK:
            client = _GCS_CLIENTS.get(key)
            if client is None:
                client = original_client(pipeline_options, use_credentials)
                _bounded_session(client._http)  # pylint: disable=protected-access  # made here, once
                _GCS_CLIENTS[key] = client
            return client

    def get_retry(pipeline_options: Any) -> Any:
        retry = original_retry(pipeline_options)
        bound = getattr(retry, "with_timeout", None) or retry.with_deadline
        return bound(GCS_RETRY_DEADLINE_S)

    if hasattr(auth, "_Credentials") and hasattr(auth._Credentials, "_get_credentials_with_retrys"):  # pylint: disable=protected-access
        auth._Credentials._get_credentials_with_retrys = staticmethod(credentials_once)  # pylint: disable=protected-access
    gcsio.create_storage_client = create_storage_client
    gcsio_retry.get_retry = get_retry
    gcsio._lpips_pipe_shared = True  # pylint: disable=protected-access


_install_s3_client_cache()
_install_gcs_client_cache()
if not any(isinstance(item, _QuietBeamS3) for item in logging.getLogger().filters):
    logging.getLogger().addFilter(_QuietBeamS3())
