"""chunkio: frame headers, reused buffers and chunk files read without zarr."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from numcodecs import Blosc, Zstd

from relu_dask import chunkio
from relu_dask.chunkio import ChunkFormat, Scratch, blosc_content_size, read_chunk, zstd_content_size

CODECS = {"none": None, "zstd": Zstd(), "blosc": Blosc()}

# Sizes on both sides of each width of zstd's content size field (1, 2 and 4 bytes; 8 below).
SIZES = [0, 1, 255, 256, 257, 65535, 65791, 65792, 1 << 20]


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("codec", [Zstd(level=0), Zstd(level=9), Zstd(level=1, checksum=True)], ids=["l0", "l9", "crc"])
def test_zstd_content_size_reads_what_numcodecs_wrote(nbytes: int, codec: Zstd) -> None:
    data = np.random.default_rng(nbytes).integers(0, 4, nbytes, dtype=np.uint8)  # compressible, not constant
    frame = codec.encode(data)
    assert zstd_content_size(frame) == nbytes
    assert zstd_content_size(np.frombuffer(frame, dtype=np.uint8)) == nbytes


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x28\xb5\x2f", b"not a zstd frame at all", bytes.fromhex("50 2a 4d 18 00 00 00 00")],
    ids=["empty", "truncated-magic", "garbage", "skippable-frame"],
)
def test_zstd_content_size_is_none_for_what_is_not_a_sized_frame(frame: bytes) -> None:
    assert zstd_content_size(frame) is None


def test_zstd_content_size_reads_an_eight_byte_size_field() -> None:
    # Descriptor 0xE0: an 8-byte content size, single segment (no window byte), no dictionary.
    header = bytes.fromhex("28 b5 2f fd e0") + (2**33 + 5).to_bytes(8, "little")
    assert zstd_content_size(header) == 2**33 + 5
    assert zstd_content_size(header[:-1]) is None  # the field cut short


def test_zstd_content_size_is_none_for_a_frame_without_its_size() -> None:
    # A frame header with descriptor 0x00: no content size, one window descriptor byte.
    assert zstd_content_size(bytes.fromhex("28 b5 2f fd 00 58 01 00 00")) is None


@pytest.mark.parametrize("nbytes", [0, 1, 4096, (1 << 22) + 5])
def test_blosc_content_size_reads_what_numcodecs_wrote(nbytes: int) -> None:
    frame = Blosc("lz4", 5, Blosc.BITSHUFFLE).encode(np.arange(nbytes, dtype=np.uint8))
    assert blosc_content_size(frame) == nbytes
    assert blosc_content_size(frame + b"\x00") is None  # not the whole frame: zarr decides
    assert blosc_content_size(frame[:10]) is None


def test_scratch_reuses_each_roles_buffer_and_grows_it() -> None:
    scratch = Scratch()
    a = scratch.take("chunk", (4, 4), np.float32)
    a[...] = 7
    b = scratch.take("chunk", (2, 8), np.float32)
    assert np.shares_memory(a, b)  # same buffer, new view
    assert b.shape == (2, 8) and b.dtype == np.float32
    other = scratch.take("mask", (4, 4), np.int8)
    assert not np.shares_memory(other, a)
    bigger = scratch.take("chunk", (100,), np.float64)
    assert bigger.nbytes == 800 and not np.shares_memory(bigger, a)
    assert scratch.nbytes >= 800 + 16
    f_order = scratch.take("chunk", (3, 5), np.float64, order="F")
    assert f_order.flags.f_contiguous


def test_scratch_pool_lends_one_per_thread_at_work_and_releases_them() -> None:
    chunkio.release_buffers()
    inside = threading.Barrier(2)
    lent: list[Scratch] = []

    def task() -> None:
        with chunkio.scratch() as mine:
            mine.take("chunk", (1024,), np.uint8)
            lent.append(mine)
            inside.wait()  # both threads hold one at once: two distinct scratches

    threads = [threading.Thread(target=task) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lent[0] is not lent[1]
    with chunkio.scratch() as again:
        assert again in lent  # taken back into the pool and lent again
    assert chunkio.release_buffers() == 2 * (1024 + 1024 // 16)  # with headroom
    assert chunkio.release_buffers() == 0


def test_a_scratch_lent_before_a_release_is_not_taken_back() -> None:
    """A task still running when its failed run released the pool lets go of its buffers."""
    chunkio.release_buffers()
    with chunkio.scratch() as late:
        late.take("chunk", (4096,), np.uint8)
        chunkio.release_buffers()  # the run ends while this task still holds its scratch
    with chunkio.scratch() as next_one:
        assert next_one is not late
    assert chunkio.release_buffers() == 0  # next_one took no buffer; late was dropped


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_read_chunk_decodes_the_file_bit_for_bit(tmp_path: Path, compressor: str, order: str) -> None:
    x = np.random.default_rng(1).standard_normal((6, 10)).astype(">f4")
    x[0, :3] = [np.nan, -0.0, np.inf]
    raw = x.tobytes(order=order)
    stored = {"none": raw, "zstd": Zstd().encode(raw), "blosc": Blosc().encode(raw)}[compressor]
    path = tmp_path / "0.0"
    path.write_bytes(stored)
    fmt = ChunkFormat((6, 10), np.dtype(">f4"), order, CODECS[compressor])
    scratch = Scratch()
    for _ in range(2):  # the second read reuses the first's buffers
        got = read_chunk(path, fmt, scratch)
        assert got is not None
        assert got.dtype == np.dtype(">f4") and got.shape == (6, 10)
        assert got.tobytes(order="C") == x.tobytes(order="C")


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("nbytes", [32, 96], ids=["short", "long"])
def test_read_chunk_declines_a_file_of_another_size(tmp_path: Path, compressor: str, nbytes: int) -> None:
    raw = bytes(range(nbytes))
    stored = {"none": raw, "zstd": Zstd().encode(raw), "blosc": Blosc().encode(raw)}[compressor]
    path = tmp_path / "c"
    path.write_bytes(stored)
    assert read_chunk(path, ChunkFormat((8, 8), np.dtype("u1"), "C", CODECS[compressor]), Scratch()) is None


def test_read_chunk_raises_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_chunk(tmp_path / "absent", ChunkFormat((2,), np.dtype("f8")), Scratch())


def test_chunk_format_quotes_what_it_refuses() -> None:
    from numcodecs import GZip

    with pytest.raises(ValueError, match="GZip"):
        ChunkFormat((2,), np.dtype("f8"), "C", GZip())
    with pytest.raises(ValueError, match="'K'"):
        ChunkFormat((2,), np.dtype("f8"), "K")
    assert ChunkFormat((3, 4), "f8").nbytes == 96


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc"])
def test_write_chunk_writes_what_read_chunk_reads_and_leaves_no_partial_file(tmp_path: Path, compressor: str) -> None:
    fmt = ChunkFormat((3, 5), np.dtype("i1"), "C", CODECS[compressor])
    chunk = np.arange(15, dtype=np.int8).reshape(3, 5)
    path = tmp_path / "c" / "0" / "1"
    chunkio.write_chunk(path, chunk, fmt)  # its folders are made as needed
    chunkio.write_chunk(path, chunk[::-1].copy(), fmt)  # and replaced whole
    got = read_chunk(path, fmt, Scratch())
    assert got is not None and np.array_equal(got, chunk[::-1])
    assert [p.name for p in path.parent.iterdir()] == ["1"]


def test_write_chunk_refuses_a_piece_of_a_chunk(tmp_path: Path) -> None:
    fmt = ChunkFormat((4, 4), np.dtype("i1"))
    with pytest.raises(ValueError, match="a chunk of"):
        chunkio.write_chunk(tmp_path / "0", np.zeros((4, 4), np.int8)[:, :2], fmt)
    with pytest.raises(ValueError, match="C-ordered"):
        chunkio.write_chunk(tmp_path / "0", np.zeros((4, 4), np.int8)[:, ::-1], fmt)
    assert not list(tmp_path.iterdir())


def _vm_flags_of(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``address`` (Linux /proc/self/smaps)."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(part, 16) for part in head.split("-"))
            mapping = lo <= address < hi
        elif head == "VmFlags:" and mapping:
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _kernel_takes_huge_page_advice() -> bool:
    import mmap

    if not Path("/proc/self/smaps").exists() or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return False
    region = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
    try:
        region.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:  # a kernel without transparent huge pages
        return False
    finally:
        region.close()
    return True


@pytest.mark.skipif(not _kernel_takes_huge_page_advice(), reason="needs Linux /proc and a kernel with huge pages")
@pytest.mark.parametrize("nbytes", [1, 4096, 5 << 20])
def test_scratch_buffers_are_zeroed_writable_and_advised_out_of_huge_pages(nbytes: int) -> None:
    buffer = chunkio.small_page_buffer(nbytes)
    assert buffer.dtype == np.uint8 and buffer.shape == (nbytes,)
    assert buffer.flags.writeable and not buffer.any()
    buffer[:] = 7
    assert int(buffer.sum()) == 7 * nbytes
    assert "nh" in _vm_flags_of(buffer.ctypes.data)  # MADV_NOHUGEPAGE took
    # what a Scratch hands out lives in such buffers
    view = Scratch().take(chunkio.CHUNK, (nbytes,), np.uint8)
    assert "nh" in _vm_flags_of(view.ctypes.data)
    big = np.empty(5 << 20, dtype=np.uint8)  # the control: numpy's own large array is not so advised
    assert "nh" not in _vm_flags_of(big.ctypes.data)
