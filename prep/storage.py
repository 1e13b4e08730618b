"""The one storage seam: a folder or a URL is resolved once (`location`) and handed down as a `Location`.

Everywhere a folder goes, a URL goes: a local path (or `file://`), `s3://bucket/prefix` (s3fs) or
`gs://bucket/prefix` (gcsfs), resolved with `fsspec.core.url_to_fs` as img2dataset does. Any other scheme is
refused with one line (`StorageError("unsupported_url")`), never taken for a local folder: `Path("s3://b/x")`
would silently become a local folder `s3:`.

Credentials and endpoints come the standard way, from the cloud SDK's own configuration: the environment
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_PROFILE`, `AWS_ENDPOINT_URL` for an S3-compatible store
such as MinIO; `GOOGLE_APPLICATION_CREDENTIALS`) or `~/.aws`, `gcloud`. Nothing here reads, logs or stores them:
a `Location` prints as its URL only.

Writes (`prep.io.atomic_open`, `write_bytes_atomic`, `write_json_atomic`) are all-or-nothing: a local file is
written to a temp file beside it and renamed; an object is written to a local temp file and uploaded whole
(an object store's PUT is atomic), so a killed writer leaves no partial object. A build's done marker, written
last, is what commits a shard group on either.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prep.errors import ContralateralError

# scheme -> the fsspec implementation's package (what `pip install` needs)
SERVED_SCHEMES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
LOCAL_SCHEMES = ("file", "local")
# `scheme:/...`: two letters at least, so a Windows drive (`C:/`) stays a path; one slash catches a URL that
# already went through `pathlib.Path` (`s3://b` -> `s3:/b`)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


class StorageError(ContralateralError):
    """A folder or object that cannot be used. `reason`: unsupported_url, no_bucket, access_denied,
    storage_unreachable."""


def scheme_of(target: str) -> str:
    """`s3` for `s3://b/k`, "" for a local path."""
    match = _SCHEME.match(target)
    return match.group(1).lower() if match else ""


@dataclass(frozen=True)
class Location:
    """A folder or file on one filesystem: `fs` (fsspec, resolved once) and its `path` there (posix, no scheme).

    The pathlib subset the build and the trainer use (`/`, `name`, `parent`, `is_file`, `glob`, ...), so code
    written for folders runs unchanged on buckets. Pickles with its filesystem's own arguments (never
    credentials from the environment), so a Dask task or a loader worker gets a working copy.
    """

    fs: object = dataclasses.field(repr=False, compare=False)
    path: str
    protocol: str = ""  # "" for the local filesystem

    def __truediv__(self, rel: str | os.PathLike) -> "Location":
        return dataclasses.replace(self, path=posixpath.normpath(posixpath.join(self.path, str(rel))))

    def __str__(self) -> str:
        return self.url

    @property
    def url(self) -> str:
        """What a user (and webdataset, pyarrow) reads: the local path, or `s3://bucket/key`."""
        return f"{self.protocol}://{self.path}" if self.protocol else self.path

    @property
    def is_local(self) -> bool:
        return not self.protocol

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> "Location":
        return dataclasses.replace(self, path=posixpath.dirname(self.path.rstrip("/")))

    def relative_to(self, other: "Location") -> str:
        return posixpath.relpath(self.path, other.path)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def size(self) -> int:
        return int(self.fs.size(self.path))

    def open(self, mode: str = "rb") -> IO:
        """Read access; every write goes through `prep.io.atomic_open`."""
        if "r" not in mode:
            raise ValueError("Location.open reads; write through prep.io.atomic_open")
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def glob(self, pattern: str) -> list["Location"]:
        """Matches of `pattern` under this folder, sorted (one listing on an object store)."""
        return [dataclasses.replace(self, path=p) for p in sorted(self.fs.glob(posixpath.join(self.path, pattern)))]

    def listing(self) -> dict[str, int]:
        """Every file below this folder: path relative to it -> size in bytes (one recursive listing)."""
        if not self.fs.isdir(self.path):
            return {}
        found = self.fs.find(self.path, detail=True)
        return {posixpath.relpath(p, self.path): int(info.get("size") or 0) for p, info in found.items()
                if info.get("type", "file") == "file"}

    def delete(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        """Delete this folder and everything below it (nothing when it does not exist)."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def mkdir(self) -> None:
        """Local folders only; object stores have no folders."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)


def location(target: str | os.PathLike | Location) -> Location:
    """Resolve a local path or a served URL once; refuse any other scheme (`StorageError`)."""
    if isinstance(target, Location):
        return target
    text = os.fspath(target)
    scheme = scheme_of(text)
    if scheme and not text[len(scheme):].startswith("://"):
        raise StorageError("unsupported_url", f"{text}: a URL with one slash after {scheme}: (a folder path "
                                              f"cannot start with a scheme); write {scheme}://...")
    if scheme in LOCAL_SCHEMES:
        text, scheme = re.sub(r"^[A-Za-z]+://", "", text), ""
    if not scheme:
        from fsspec.implementations.local import LocalFileSystem

        return Location(LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
    package = SERVED_SCHEMES.get(scheme)
    if package is None:
        raise StorageError("unsupported_url", f"{text}: {scheme}:// is not a storage this project serves "
                                              "(a local folder, s3://bucket/prefix or gs://bucket/prefix)")
    if importlib.util.find_spec(package) is None:
        raise StorageError("unsupported_url", f"{text}: {scheme}:// needs the {package} package "
                                              f"(pip install {package})")
    import fsspec

    fs, path = fsspec.core.url_to_fs(text)
    return Location(fs, path.rstrip("/"), protocol=scheme)


def local_path(target: str | os.PathLike, flag: str) -> Path:
    """A folder that stays local (a training run: checkpoints, an appended metrics.jsonl, TensorBoard; an
    evaluation's report and figures): a served URL is refused with the way out, any other scheme as unserved."""
    if not location(target).is_local:
        raise StorageError("unsupported_url", f"{flag} {target}: must be a local folder (a run dir is appended to "
                                              "while it runs); copy it to object storage when it is done")
    return Path(target)


def check_storage(target: Location) -> None:
    """Reach the bucket (or local folder's filesystem) once, up front, so a missing bucket or bad credentials
    is one clear line before any work starts, not a traceback from a Dask task."""
    if target.is_local:
        return
    bucket = target.path.split("/", 1)[0]
    try:
        target.fs.ls(bucket, detail=False)
    except Exception as exc:  # each SDK raises its own types; map them to reasons
        raise storage_error(exc, f"{target.protocol}://{bucket}") from None


def storage_error(exc: BaseException, where: str) -> StorageError:
    """The one-line `StorageError` for an SDK exception (no credentials in the text)."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text:
        return StorageError("no_bucket", f"{where}: no such bucket ({text})")
    if isinstance(exc, PermissionError) or any(code in text for code in (
            "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "credentials")):
        return StorageError("access_denied", f"{where}: access denied; check the credentials in the environment "
                                             f"or the SDK's config ({text})")
    return StorageError("storage_unreachable", f"{where}: {text}")


def open_url(url: str) -> IO[bytes]:
    """Open a shard (a local path or a served URL) for reading: the loader's and verify's one opener."""
    if not scheme_of(url) and not url.startswith("file://"):
        return open(url, "rb")
    target = location(url)
    return target.fs.open(target.path, "rb")
