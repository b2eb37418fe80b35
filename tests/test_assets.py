from __future__ import annotations

import threading
import time
from pathlib import Path

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
