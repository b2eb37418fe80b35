from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from peft_infosteer import assets


def _write_converted(out: Path) -> Path:
    out.mkdir(parents=True)  # a second conversion would find the directory there and fail
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    return out


def _slow_conversion(out: Path, calls: list[int]):
    def convert() -> Path:
        calls.append(1)
        time.sleep(0.3)  # long enough for every other caller to arrive while it runs
        return _write_converted(out)

    return convert


def test_callers_asking_at_once_share_one_conversion(tmp_path):
    out = tmp_path / "cache" / "model"
    calls: list[int] = []
    results: list[Path] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(assets._convert_once(out, _slow_conversion(out, calls)))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 1
    assert results == [out] * 4


def test_a_converted_directory_is_returned_without_converting(tmp_path):
    out = _write_converted(tmp_path / "model")
    calls: list[int] = []
    assert assets._convert_once(out, _slow_conversion(out, calls)) == out
    assert calls == []


def test_joining_parts_writes_their_concatenation(tmp_path):
    chunks = [tmp_path / "a.gguf.part1", tmp_path / "a.gguf.part2"]
    chunks[0].write_bytes(b"GGUF")
    chunks[1].write_bytes(b"-rest")
    assets._join_files(chunks, tmp_path / "joined.gguf")
    assert (tmp_path / "joined.gguf").read_bytes() == b"GGUF-rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf.part1", "a.gguf.part2", "joined.gguf"]


def test_a_join_cut_short_leaves_no_file_to_reuse(tmp_path):
    first = tmp_path / "a.gguf.part1"
    first.write_bytes(b"GGUF")
    joined = tmp_path / "joined.gguf"
    with pytest.raises(FileNotFoundError):
        assets._join_files([first, tmp_path / "missing.gguf.part2"], joined)
    assert not joined.exists()  # else the next call would convert a truncated file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf.part1"]
