"""How the stages' Faiss indexes are chosen: IVF probes from the list count, GPUs only where Faiss has them,
and a clear word when Faiss is missing."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from curation.search.knn import (
    IVF_MIN_PROBES,
    SEARCH_BATCH_ROWS,
    ArrayVectors,
    build_index,
    fill_presized,
    ivf_lists,
    ivf_probes,
    on_gpus,
)


@pytest.mark.parametrize(
    ("rows", "probes"),
    [
        (200_000, 18),  # 1,788 lists: 1% is 17.88, rounded up
        (500_000, 29),  # 2,828 lists
        (1_000_000, 40),  # 4,000 lists
        (20_000, IVF_MIN_PROBES),  # 564 lists: 1% is under the floor
    ],
)
def test_default_probes_are_one_percent_of_the_lists_with_a_floor(rows, probes):
    assert ivf_probes(ivf_lists(rows)) == probes


def test_probes_given_in_the_config_win_but_never_exceed_the_lists():
    assert ivf_probes(1_788, 32) == 32
    assert ivf_probes(5, 32) == 5
    assert ivf_probes(5) == 5


def test_a_built_ivf_index_probes_the_default_share():
    vectors = np.random.default_rng(0).normal(size=(40_000, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(vectors, "ivf")
    assert (index.nlist, index.nprobe) == (800, IVF_MIN_PROBES)  # 4 * 200 lists; 1% of them is 8
    assert build_index(vectors, "ivf", nprobe=3).nprobe == 3
    assert build_index(vectors, "ivf", lists=50).nlist == 50  # the config's `ivf_lists` wins


@pytest.mark.parametrize(("bits", "code_bytes", "worst_error"), [(8, 64, 0.01), (4, 32, 0.1)])
def test_an_ivfsq_index_holds_codes_and_scores_near_copies_close_to_their_cosine(
    bits, code_bytes, worst_error
):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(20_000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    copies = vectors[:500] + 0.5 / np.sqrt(64) * rng.normal(size=(500, 64)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    index = build_index(vectors, "ivfsq", nprobe=64, sq_bits=bits)
    assert isinstance(index, faiss.IndexIVFScalarQuantizer) and index.code_size == code_bytes
    scores, found = index.search(copies, 1)
    assert (found[:, 0] == np.arange(500)).mean() > 0.99
    cosines = np.einsum("ij,ij->i", copies, vectors[:500])
    error = np.abs(scores[:, 0] - cosines).max()
    assert 0 < error < worst_error  # approximate, and close


def _list_contents(index: faiss.IndexIVF) -> list[tuple[np.ndarray, bytes]]:
    """Each list's row ids and codes, in list order."""
    lists = index.invlists
    contents = []
    for list_no in range(index.nlist):
        size = lists.list_size(list_no)
        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).tobytes()
        contents.append((ids, codes))
    return contents


@pytest.mark.parametrize("kind", ["ivf", "ivfsq"])
def test_a_presized_fill_holds_the_lists_that_appending_blocks_makes(kind):
    # Rows over two fill blocks, so a list gets rows from each block as with `index.add`.
    vectors = np.random.default_rng(2).normal(size=(SEARCH_BATCH_ROWS + 3_000, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = build_index(vectors, kind, lists=40, sq_bits=8)  # filled by `fill_presized`
    appended = faiss.clone_index(built)
    appended.reset()  # the trained lists and quantiser, no rows
    for start in range(0, len(vectors), SEARCH_BATCH_ROWS):
        appended.add(vectors[start : start + SEARCH_BATCH_ROWS])
    refilled = faiss.clone_index(appended)
    refilled.reset()
    fill_presized(refilled, ArrayVectors(vectors))
    expected = _list_contents(appended)
    assert sum(len(ids) for ids, _ in expected) == len(vectors)
    for index in (built, refilled):
        assert index.ntotal == len(vectors)
        for (ids, codes), (expected_ids, expected_codes) in zip(_list_contents(index), expected, strict=True):
            np.testing.assert_array_equal(ids, expected_ids)
            assert codes == expected_codes


def test_an_index_moves_to_gpus_only_when_asked_and_faiss_sees_some():
    index = faiss.IndexFlatIP(4)
    assert on_gpus(index, use_gpu=False) is index
    assert (on_gpus(index, use_gpu=True) is index) == (faiss.get_num_gpus() == 0)
    vectors = np.eye(4, dtype=np.float32)
    on_cpu, asked = build_index(vectors, "flat"), build_index(vectors, "flat", use_gpu=True)
    np.testing.assert_array_equal(asked.search(vectors, 1)[1], on_cpu.search(vectors, 1)[1])


def test_importing_the_stages_without_faiss_names_the_extras_to_install():
    blocked = "import sys; sys.modules['faiss'] = None; import curation"
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert "pip install 'lvd[cpu]' (faiss-cpu), or 'lvd[gpu]' (faiss-gpu-cu12)" in last_line
