"""Downloads by URL into a cache: against a server on 127.0.0.1, including a cut-off transfer that the
next call resumes, a corrupt file, and no server at all."""

from __future__ import annotations

import hashlib
import socket

import pytest

from pipelines.downloads import DownloadError, fetch
from tests.local_http import Served, serve

CONTENT = bytes(range(256)) * 4096  # 1 MiB, every byte value
PATH = "/weights/model.pth"


def test_a_download_lands_once_and_later_calls_touch_no_network(tmp_path):
    served = Served({PATH: CONTENT})
    with serve(served) as base:
        first = fetch(base + PATH, tmp_path, show_progress=False)
        second = fetch(base + PATH, tmp_path, show_progress=False)
    assert first == second == tmp_path / "model.pth"
    assert first.read_bytes() == CONTENT
    assert len(served.requests) == 1
    assert not list(tmp_path.glob("*.part"))


def test_a_transfer_cut_off_midway_resumes_from_where_it_stopped(tmp_path):
    half = len(CONTENT) // 2
    served = Served({PATH: CONTENT}, cut_after=half)
    with serve(served) as base:
        stopped = f"stopped at {half} of {len(CONTENT)} bytes; run again to resume"
        with pytest.raises(DownloadError, match=stopped):
            fetch(base + PATH, tmp_path, show_progress=False)
        assert (tmp_path / "model.pth.part").stat().st_size == half
        assert not (tmp_path / "model.pth").exists()
        done = fetch(base + PATH, tmp_path, show_progress=False)
    assert done.read_bytes() == CONTENT
    assert served.requests[1]["range"] == f"bytes={half}-"


def test_a_server_that_ignores_ranges_sends_the_whole_file_again(tmp_path):
    served = Served({PATH: CONTENT}, cut_after=1000, honour_ranges=False)
    with serve(served) as base:
        with pytest.raises(DownloadError):
            fetch(base + PATH, tmp_path, show_progress=False)
        done = fetch(base + PATH, tmp_path, show_progress=False)
    assert done.read_bytes() == CONTENT


def test_a_corrupt_file_is_deleted_and_never_cached(tmp_path):
    expected = hashlib.sha256(CONTENT).hexdigest()
    corrupt = CONTENT[:-1] + b"\x00"
    mismatch = f"expected {expected}; deleted, retry"
    with serve(Served({PATH: corrupt})) as base, pytest.raises(DownloadError, match=mismatch):
        fetch(base + PATH, tmp_path, sha256=expected, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_without_a_server_one_line_names_the_url_and_where_to_put_the_file(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}{PATH}"
    with pytest.raises(DownloadError) as raised:
        fetch(url, tmp_path, show_progress=False)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {url} (")
    assert message.endswith(f"place the file by hand at {tmp_path / 'model.pth'}")
