"""``livediff bench``: finds a checkout's benchmarks and hands them their arguments.

No benchmark runs here but one tiny temporal run (marked slow); other runs are intercepted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from livediff import cli

CHECKOUT_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_help_lists_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "not part of the installed package" in out
    listed = out.split("benchmarks:")[-1]
    for name in ("transport", "backpressure", "stages", "worker", "sessions"):
        assert name in listed
    assert "common" not in listed and "baseline_server" not in listed


def test_an_unknown_name_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "no-such-benchmark"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no-such-benchmark'" in err
    assert "transport" in err and "worker" in err


def test_without_a_checkout_it_says_benchmarks_are_not_in_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "bench_folders", lambda: [tmp_path / "benchmarks"])
    assert cli.main(["bench", "transport"]) == 2
    err = capsys.readouterr().err
    assert "no benchmarks/ folder found" in err
    assert "not part of the livediff package" in err


def test_the_arguments_after_the_name_go_to_the_script(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def call(command: list[str]) -> int:
        calls.append(command)
        return 3

    monkeypatch.setattr(subprocess, "call", call)
    assert cli.main(["bench", "worker", "--frames", "3", "--help"]) == 3
    script = CHECKOUT_BENCHMARKS / "diffusion_worker.py"
    assert calls == [[sys.executable, str(script), "--frames", "3", "--help"]]


def test_temporal_help(capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "temporal", "--help"]) == 0
    assert "--settings" in capfd.readouterr().out


@pytest.mark.slow
def test_a_tiny_temporal_run_writes_its_json_to_out(tmp_path: Path) -> None:
    """`livediff bench temporal` on the tiny model: 6 frames at 64x64, 'off' and one more
    setting (measured, or skipped with its reason while the params do not take it)."""
    options = ["--frames", "4", "--still", "2", "--size", "64", "--device", "cpu"]
    options += ["--repeats", "1", "--settings", "off", "img-post-0.3", "--out", str(tmp_path)]
    assert cli.main(["bench", "temporal", *options]) == 0
    saved = json.loads((tmp_path / "temporal-tiny-64-cpu.json").read_text())
    assert (tmp_path / "temporal-tiny-64-cpu.png").is_file()
    rows = {row["setting"]: row for row in saved["results"]}
    assert rows["off"]["ms_per_frame"] > 0 and rows["off"]["flicker_ratio_moving"] is not None
    assert rows["off"]["ms_vs_off"] == 1.0
    assert "ms_per_frame" in rows["img-post-0.3"] or "skipped" in rows["img-post-0.3"]
