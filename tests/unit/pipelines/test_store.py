"""Atomic writes: a reader sees the old file or the whole new one, even when the disk refuses the write."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import FILE_SIZE_LIMIT, limit_file_size

WRITER = """
import sys
from pipelines.store import write_text_atomic
write_text_atomic(sys.argv[1], "new " * int(sys.argv[2]))
"""


def test_a_page_the_disk_cannot_take_leaves_the_old_page_whole(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("<!DOCTYPE html> the old page")
    words = FILE_SIZE_LIMIT  # 4 bytes a word: twice the file-size limit
    result = subprocess.run(
        [sys.executable, "-c", WRITER, str(page), str(words)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_file_size,
    )
    assert result.returncode != 0 and "File too large" in result.stderr
    assert page.read_text() == "<!DOCTYPE html> the old page"
    assert [path.name for path in tmp_path.iterdir()] == ["report.html"]  # no temp file left behind
    subprocess.run([sys.executable, "-c", WRITER, str(page), "3"], check=True, timeout=60)
    assert page.read_text() == "new new new "
