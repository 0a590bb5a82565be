"""Files fetched once by URL into a cache folder: resumable, checked, with a progress bar.

    URL --HTTP GET (Range: bytes=<have>- when a partial download is there)--> <cache>/<name>.part
      --every byte the server announced arrived?--> sha256 (and the expected one, when known)
      --rename--> <cache>/<name>; later calls find it and touch no network

A transfer cut off midway leaves the `.part` file for the next call to resume; a file that fails its
check is deleted, so the next call starts over. Without a network the error is one line: the URL and
where to put the file by hand.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from pipelines.store import local_file_sha256
from pipelines.validation import UserInputError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
PARTIAL_SUFFIX = ".part"
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416


class DownloadError(UserInputError):
    """A file could not be fetched, or what arrived is not the file; the message says what to do."""


def file_name(url: str) -> str:
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise ValueError(f"{url}: no file name in the URL")
    return name


def fetch(url: str, cache_dir: Path, *, sha256: str | None = None, show_progress: bool = True) -> Path:
    """The cached copy of `url` in `cache_dir`, downloaded (or resumed) first when it is not there."""
    target = cache_dir / file_name(url)
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    try:
        _download(url, partial, show_progress)
    except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"cannot download {url} ({reason}); without a network, place the file by hand at {target}"
        ) from err
    digest = local_file_sha256(partial)
    if sha256 is not None and digest != sha256:
        partial.unlink()
        raise DownloadError(f"{url}: the download has sha256 {digest}, expected {sha256}; deleted, retry")
    os.replace(partial, target)
    return target


def _download(url: str, partial: Path, show_progress: bool) -> None:
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == HTTP_RANGE_NOT_SATISFIABLE and have:
            return  # the partial file already holds every byte; the checks decide whether it is good
        raise
    with response:
        resumed = response.status == HTTP_PARTIAL_CONTENT
        if not resumed:
            have = 0  # the server ignored the range: start over
        announced = response.headers.get("Content-Length")
        total = have + int(announced) if announced is not None else None
        with (
            partial.open("ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=partial.name.removesuffix(PARTIAL_SUFFIX),
                disable=not show_progress,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    size = partial.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"the transfer stopped at {size} of {total} bytes; run again to resume")
