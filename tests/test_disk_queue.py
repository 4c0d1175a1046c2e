"""DiskQueue: order, acknowledgement, restart recovery (torn tail, corruption), the bound, threads."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from edge_runtime.publishing.disk_queue import HEADER_BYTES, MAGIC, DiskQueue, QueueLockedError


def rec(i: int, size: int = 40) -> bytes:
    return f"record-{i:06d}-".encode().ljust(size, b".")


def segments(d):
    return sorted(d.glob("seg-*.wal"))


def test_append_peek_ack_in_order(tmp_path):
    with DiskQueue(tmp_path / "q", 1 << 20) as q:
        idx = [q.append(rec(i)) for i in range(10)]
        assert idx == list(range(10))
        assert q.depth == 10 and q.bytes == 10 * (HEADER_BYTES + 40)
        assert q.peek(3) == [(0, rec(0)), (1, rec(1)), (2, rec(2))]
        assert q.peek(2, after=4) == [(5, rec(5)), (6, rec(6))]
        q.ack(3)
        assert q.depth == 6 and q.head == 3
        assert [i for i, _ in q.peek(100)] == [4, 5, 6, 7, 8, 9]
        q.ack(2)  # behind the head: no-op
        assert q.depth == 6
        with pytest.raises(ValueError, match="last appended is 9"):
            q.ack(10)
        q.ack(9)
        assert q.depth == 0 and q.bytes == 0 and q.peek(5) == []
        assert q.append(b"") == 10  # indices keep increasing after a full drain


def test_restart_keeps_pending_indices_and_ack_position(tmp_path):
    d = tmp_path / "q"
    with DiskQueue(d, 1 << 20, segment_bytes=300) as q:  # several segments
        for i in range(20):
            q.append(rec(i))
        q.ack(11)
        assert len(segments(d)) < 10  # fully acknowledged segments are deleted
    with DiskQueue(d, 1 << 20, segment_bytes=300) as q:
        assert q.head == 11 and q.depth == 8
        assert q.peek(100) == [(i, rec(i)) for i in range(12, 20)]
        assert q.append(b"new") == 20
        q.ack(20)
    with DiskQueue(d, 1 << 20) as q:  # everything acknowledged: indices still continue
        assert q.depth == 0 and q.append(b"x") == 21


def test_directory_is_locked_while_open(tmp_path):
    with DiskQueue(tmp_path / "q", 1 << 20):
        with pytest.raises(QueueLockedError):
            DiskQueue(tmp_path / "q", 1 << 20)
    DiskQueue(tmp_path / "q", 1 << 20).close()


@pytest.mark.parametrize("garbage", [b"\x00\x00\x00\x30\x12", b"\xff" * 40, b"\x00" * 64, "torn-record"])
def test_torn_tail_is_truncated_and_earlier_records_kept(tmp_path, caplog, garbage):
    d = tmp_path / "q"
    with DiskQueue(d, 1 << 20) as q:
        for i in range(5):
            q.append(rec(i))
        q.ack(0)
    seg = segments(d)[-1]
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        if garbage == "torn-record":  # a real record cut short by a crash
            f.write(q_record_bytes(5, rec(5))[:-7])
        else:
            f.write(garbage)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.publishing.disk_queue"):
        q = DiskQueue(d, 1 << 20)
    with q:
        assert "truncating a torn record" in caplog.text
        assert seg.stat().st_size == size
        assert q.peek(10) == [(i, rec(i)) for i in range(1, 5)]
        assert q.append(rec(5)) == 5
    with DiskQueue(d, 1 << 20) as q:  # appends after the repair are readable
        assert [i for i, _ in q.peek(10)] == [1, 2, 3, 4, 5]
    assert not list(d.glob("*.corrupt"))


def q_record_bytes(index: int, payload: bytes) -> bytes:
    import struct
    import zlib

    crc = zlib.crc32(payload, zlib.crc32(index.to_bytes(8, "big")))
    return struct.pack(">IIQ", len(payload), crc, index) + payload


def test_corruption_in_the_middle_is_quarantined(tmp_path, caplog):
    """Decision: stop reading that segment at the bad record, move the rest to .corrupt, keep later segments."""
    d = tmp_path / "q"
    with DiskQueue(d, 1 << 20, segment_bytes=len(MAGIC) + 5 * (HEADER_BYTES + 40)) as q:
        for i in range(12):  # segments of 5 records: [0..4] [5..9] [10, 11]
            q.append(rec(i))
    first = segments(d)[0]
    data = bytearray(first.read_bytes())
    bad = len(MAGIC) + 2 * (HEADER_BYTES + 40) + HEADER_BYTES + 3  # payload byte of record 2
    data[bad] ^= 0xFF
    first.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="edge_runtime.publishing.disk_queue"):
        q = DiskQueue(d, 1 << 20)
    with q:
        assert "CRC mismatch" in caplog.text and "corrupt" in caplog.text
        assert [i for i, _ in q.peek(100)] == [0, 1, 5, 6, 7, 8, 9, 10, 11]
        corrupt = list(d.glob("*.corrupt"))
        assert len(corrupt) == 1 and corrupt[0].stat().st_size == 3 * (HEADER_BYTES + 40)
        assert q.append(b"after") == 12


def test_corruption_mid_last_segment_is_quarantined_not_truncated_silently(tmp_path, caplog):
    d = tmp_path / "q"
    with DiskQueue(d, 1 << 20) as q:
        for i in range(6):
            q.append(rec(i))
    seg = segments(d)[-1]
    data = bytearray(seg.read_bytes())
    data[len(MAGIC) + 1 * (HEADER_BYTES + 40) + 5] ^= 0x01  # CRC field of record 1, records follow it
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="edge_runtime.publishing.disk_queue"):
        q = DiskQueue(d, 1 << 20)
    with q:
        assert [i for i, _ in q.peek(100)] == [0]
        assert "moved to" in caplog.text
        # Indices of the quarantined records were never acknowledged, so handing them out again is harmless.
        assert q.append(b"next") == 1
        assert [i for i, _ in q.peek(100)] == [0, 1]


def test_bad_magic_file_moved_aside(tmp_path, caplog):
    d = tmp_path / "q"
    with DiskQueue(d, 1 << 20) as q:
        q.append(rec(0))
    (d / "seg-00000000000000000099.wal").write_bytes(b"not a segment at all")
    with caplog.at_level(logging.ERROR), DiskQueue(d, 1 << 20) as q:
        assert q.peek(5) == [(0, rec(0))]
        assert (d / "seg-00000000000000000099.wal.corrupt").exists()
        assert "bad magic" in caplog.text


def test_bound_drops_oldest_and_counts(tmp_path, caplog):
    size = HEADER_BYTES + 40
    d = tmp_path / "q"
    with caplog.at_level(logging.ERROR, logger="edge_runtime.publishing.disk_queue"):
        with DiskQueue(d, 10 * size, segment_bytes=4 * size) as q:
            for i in range(25):
                q.append(rec(i))
            assert q.depth == 10 and q.bytes == 10 * size
            assert q.dropped == 15
            assert [i for i, _ in q.peek(100)] == list(range(15, 25))
            with pytest.raises(ValueError, match="does not fit"):
                q.append(b"x" * (10 * size))
    assert "dropped the 1 oldest unsent record(s)" in caplog.text  # first report; later ones rate-limited
    assert sum(s.stat().st_size for s in segments(d)) <= 10 * size + 2 * 4 * size + 8 * len(MAGIC)
    with DiskQueue(d, 10 * size) as q:
        assert q.dropped == 15 and q.depth == 10 and q.peek(1)[0][0] == 15
    assert json.loads((d / "state.json").read_text())["dropped"] == 15


def test_concurrent_append_and_ack(tmp_path):
    n = 300
    q = DiskQueue(tmp_path / "q", 1 << 22, segment_bytes=4096)
    seen: list[int] = []
    payloads: dict[int, bytes] = {}
    done = threading.Event()
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            for i in range(n):
                payloads[q.append(rec(i))] = rec(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def consumer() -> None:
        try:
            while not (done.is_set() and q.depth == 0):
                batch = q.peek(7)
                for index, payload in batch:
                    assert payload == rec(index)
                    seen.append(index)
                if batch:
                    q.ack(batch[-1][0])
                else:
                    time.sleep(0.001)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert seen == list(range(n))
    assert q.depth == 0 and len(segments(tmp_path / "q")) == 1
    q.close()


def test_append_is_fast(tmp_path):
    with DiskQueue(tmp_path / "q", 1 << 24) as q:
        payload = b"r" * 1024
        q.append(payload)
        t0 = time.perf_counter()
        for _ in range(30):
            q.append(payload)
        per = (time.perf_counter() - t0) / 30
    assert per < 0.05, f"append+fsync of 1 KiB took {per * 1e3:.1f} ms"
