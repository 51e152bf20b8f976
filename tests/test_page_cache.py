"""Rank files in 2 MB pages: the converter hands the kernel whole aligned 2 MB blocks, so that the
page cache holds a file just converted in 2 MB folios, and the runtime asks for huge pages on its
mapping, so that a file read back from disk is read in 2 MB folios (README, "Performance")."""
import os
from pathlib import Path

import pytest

import qwen3pack
from qwen3pack.convert import convert
from qwen3pack.formats.rankfile import WRITE_BLOCK
from qwen3pack.testing import mappings_of, share_in_2mb_folios

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # bf16 rank files of about 8 MB each at tp=2, whose tensors and parts start anywhere in a block
    from qwen3pack.testing import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("source"), dtype="bf16", vocab_size=30_000, hidden_size=256,
                           intermediate_size=600, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def test_rank_files_reach_the_kernel_in_whole_aligned_2mb_blocks(source, tmp_path, monkeypatch):
    writes = []  # (path, offset, bytes) of every pwrite while converting
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        writes.append((os.readlink(f"/proc/self/fd/{fd}"), offset, memoryview(data).nbytes))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    convert(source, tmp_path / "out", tp=2)
    for rank_file in sorted((tmp_path / "out").glob("*.q3p")):
        size = rank_file.stat().st_size
        assert size > 3 * WRITE_BLOCK
        ours = [(offset, n) for path, offset, n in writes if Path(path).name == rank_file.name]
        # The header is written last, into the first block (written already): the data before it,
        # each block once. A block that one piece of data fills is written as it comes, before a
        # block still being gathered, so the order is not the file's.
        *blocks, header = ours
        assert header[0] == 0 and header[1] < WRITE_BLOCK
        assert sorted(blocks) == [(b, min(WRITE_BLOCK, size - b)) for b in range(0, size, WRITE_BLOCK)]
        assert blocks != sorted(blocks), "no block was written without being gathered"
    assert qwen3pack.validate(tmp_path / "out").ok


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages")
def test_a_model_loaded_right_after_conversion_maps_its_weights_in_2mb_pages(source, tmp_path):
    # Whether the kernel and filesystem keep a file's page cache in folios as large as the writes
    # (Linux 6.x: ext4, xfs, btrfs, tmpfs with huge pages) is seen on a file of our own first.
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(2 * WRITE_BLOCK))
    if share_in_2mb_folios(probe) == 0:
        pytest.skip("this filesystem keeps written files in small folios")

    convert(source, tmp_path / "out", tp=1)
    model = qwen3pack.load(tmp_path / "out", max_context=16)
    model.session().append([1, 2, 3])  # reads every weight
    rank_file = next((tmp_path / "out").glob("*.q3p")).resolve()
    [mapping] = mappings_of(rank_file)
    # All but the last block, which ends with the file: it is smaller than a huge page.
    assert mapping["FilePmdMapped"] >= mapping["Rss"] - WRITE_BLOCK // 1024
    model.close()


@pytest.mark.skipif(not THP.exists(), reason="no transparent huge pages")
def test_the_runtime_asks_for_huge_pages_on_its_mapping_of_the_rank_files(source, tmp_path):
    convert(source, tmp_path / "out", tp=2)
    model = qwen3pack.load(tmp_path / "out", max_context=16)
    for rank_file in sorted((tmp_path / "out").glob("*.q3p")):
        [mapping] = mappings_of(rank_file.resolve())
        assert "hg" in mapping["VmFlags"], rank_file.name
    model.close()
