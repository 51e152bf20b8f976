"""How rank files are written and read back: the converter hands the disk whole aligned 2 MB blocks
with O_DIRECT, past the page cache (through it, in the same blocks, where the filesystem refuses
O_DIRECT), and the runtime asks for huge pages on its mapping, so that a model read back from disk
is read in 2 MB folios and mapped in 2 MB pages (README, "Performance")."""
import errno
import fcntl
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import qwen3pack
from qwen3pack.cli import main
from qwen3pack.convert import convert
from qwen3pack.formats.rankfile import WRITE_BLOCK
from qwen3pack.testing import TRANSPARENT_HUGE_PAGES, huge_pages_enabled, mappings_of, share_in_2mb_folios

O_DIRECT = getattr(os, "O_DIRECT", 0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # bf16 rank files of about 8 MB each at tp=2, whose tensors and parts start anywhere in a block
    from qwen3pack.testing import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("source"), dtype="bf16", vocab_size=30_000, hidden_size=256,
                           intermediate_size=600, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def takes_o_direct(folder):
    if not O_DIRECT:
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)


def recorded_pwrites(monkeypatch):
    """[(file name, offset, bytes, written with O_DIRECT)] of every pwrite that succeeds from now on."""
    writes = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        written = real_pwrite(fd, data, offset)
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        writes.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, written, direct))
        return written

    monkeypatch.setattr(os, "pwrite", pwrite)
    return writes


def test_rank_files_reach_the_disk_in_whole_aligned_2mb_blocks_past_the_page_cache(source, tmp_path, monkeypatch):
    direct = takes_o_direct(tmp_path)
    writes = recorded_pwrites(monkeypatch)
    convert(source, tmp_path / "out", tp=2)
    for rank_file in sorted((tmp_path / "out").glob("*.q3p")):
        size = rank_file.stat().st_size
        assert size > 3 * WRITE_BLOCK
        ours = [write[1:] for write in writes if write[0] == rank_file.name]
        # Each block once, in file order; then the header, written last into the first block
        # through the page cache (it is a few KB, at no multiple of the disk's sector).
        *blocks, header = ours
        assert blocks == [(b, min(WRITE_BLOCK, size - b), direct) for b in range(0, size, WRITE_BLOCK)]
        assert header[0] == 0 and header[1] < WRITE_BLOCK and header[2] is False
    assert qwen3pack.validate(tmp_path / "out").ok


def refuse_o_direct_at_open(monkeypatch):
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as tmpfs before Linux 6.6
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def refuse_o_direct_writes(monkeypatch):
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # opened, but its alignment refused
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this system")
@pytest.mark.parametrize("refuse", [refuse_o_direct_at_open, refuse_o_direct_writes])
def test_where_the_filesystem_refuses_o_direct_the_blocks_go_through_the_page_cache(source, tmp_path, monkeypatch, refuse):
    convert(source, tmp_path / "direct", tp=2)
    refuse(monkeypatch)
    writes = recorded_pwrites(monkeypatch)
    convert(source, tmp_path / "cached", tp=2)
    assert writes and not any(direct for *_, direct in writes)
    for rank_file in sorted((tmp_path / "direct").glob("*.q3p")):
        assert (tmp_path / "cached" / rank_file.name).read_bytes() == rank_file.read_bytes()


def test_a_block_that_cannot_be_written_is_one_error_line_and_leaves_nothing(source, tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    blocks = []

    def disk_full_at_the_third_block(fd, data, offset):
        blocks.append(offset)
        if len(blocks) == 3:  # in the thread that writes the blocks, while the next is gathered
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_full_at_the_third_block)
    result = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not huge_pages_enabled(), reason="no transparent huge pages")
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
    # The conversion left the data out of the page cache: the model reads it back from disk, in 2 MB
    # folios where its accesses fault. That is 99% of a 0.6B rank file; of this 17 MB one about 70%
    # (the kernel's readahead around the first accesses takes small folios), and 47% when the header
    # was read with readahead (reader.read_rank_file says why it is not).
    assert mapping["FilePmdMapped"] >= mapping["Rss"] / 2
    model.close()


@pytest.mark.skipif(not TRANSPARENT_HUGE_PAGES.exists(), reason="no transparent huge pages")
def test_the_runtime_asks_for_huge_pages_on_its_mapping_of_the_rank_files(source, tmp_path):
    convert(source, tmp_path / "out", tp=2)
    model = qwen3pack.load(tmp_path / "out", max_context=16)
    for rank_file in sorted((tmp_path / "out").glob("*.q3p")):
        [mapping] = mappings_of(rank_file.resolve())
        assert "hg" in mapping["VmFlags"], rank_file.name
    model.close()
