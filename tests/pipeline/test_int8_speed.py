"""The INT8 search's speed decision: a mix is kept only when its slowest round beats FP32's fastest, from five
interleaved rounds; a disturbed run is measured again and never cached; an undisturbed decision is replayed from the
stage cache, so a rebuild gives the same verdict. And the table's guard: a kept mix the build's own timing shows
slower than its engine's FP32 is timed again with it, and marked invalid when it still is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.benchmarks.schema import Timing
from bitdeploy.builder import timing as build_timing
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.search_speed import FP32, MIX, UNIFORM, decide
from bitdeploy.builder.timing import DECISION_ROUNDS, Timed, faster
from bitdeploy.core.cache import StageCache
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.bundle.manifest_mix import Candidate, Int8Mix
from tests.rows import row


def _timing(p50: float, lo: float, hi: float, disturbed: tuple[str, ...] = ()) -> Timing:
    return Timing(p50_ms=p50, p50_spread=(lo, hi), disturbed=disturbed)


class FakeClock:
    """`timing.time_bundles` stand-in: each call returns the next run's figures for the items, by name."""

    def __init__(self, *runs: dict[str, Timing]) -> None:
        self.runs, self.calls = list(runs), []

    def __call__(self, items: Any, threads: Any, timing: Any, log: Any, rounds: int | None = None) -> list[Timing]:
        self.calls.append(rounds)
        run = self.runs[min(len(self.calls), len(self.runs)) - 1]
        return [run[item.name] for item in items]


def _items() -> dict[str, tuple[Timed, str]]:
    return {
        name: (Timed(name, Path(f"{name}.onnx"), Manifest(), "cpu", 32), f"key-{name}") for name in (FP32, UNIFORM, MIX)
    }


QUICK = {FP32: _timing(1.0, 0.95, 1.05), UNIFORM: _timing(0.5, 0.45, 0.55), MIX: _timing(0.6, 0.55, 0.65)}


def test_kept_only_when_the_slowest_round_beats_fp32s_fastest() -> None:
    assert faster(_timing(0.6, 0.55, 0.94), _timing(1.0, 0.95, 1.05))
    assert not faster(_timing(0.6, 0.55, 0.96), _timing(1.0, 0.95, 1.05))  # the spreads overlap: not shown faster
    assert not faster(None, _timing(1.0, 0.95, 1.05)) and not faster(Timing(), Timing())


def test_an_undisturbed_decision_is_cached_and_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(QUICK)
    monkeypatch.setattr(build_timing, "time_bundles", clock)
    opts, cache, lines = BuildOptions(model="tiny", out=tmp_path), StageCache(tmp_path / "cache"), []
    first = decide(_items(), opts, cache, lines.append)
    assert first.kept and not first.cached and first.rounds == DECISION_ROUNDS and clock.calls == [DECISION_ROUNDS]
    assert (
        "p50 0.60 ms [0.55-0.65] vs uniform INT8 0.50 ms [0.45-0.55] and FP32 1.00 ms [0.95-1.05]" in first.describe()
    )
    again = decide(_items(), opts, cache, lines.append)  # the rebuild: the same verdict, nothing timed
    assert again.kept and again.cached and len(clock.calls) == 1 and again.p50 == first.p50
    assert "int8-speed" in cache.hits and "(cached)" in again.describe()
    other = {**_items(), MIX: (_items()[MIX][0], "key-another-mix")}
    assert not decide(other, opts, cache, lines.append).cached and len(clock.calls) == 2  # keyed by the bundles


def test_a_disturbed_run_is_measured_again_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    busy = {**QUICK, FP32: _timing(1.0, 0.5, 1.5, ("other processes used 1.2 cores",))}
    clock = FakeClock(busy, busy)
    monkeypatch.setattr(build_timing, "time_bundles", clock)
    opts, cache, lines = BuildOptions(model="tiny", out=tmp_path), StageCache(tmp_path / "cache"), []
    verdict = decide(_items(), opts, cache, lines.append)
    assert clock.calls == [DECISION_ROUNDS, DECISION_ROUNDS] and any(
        "measuring the mix and FP32 again" in x for x in lines
    )
    assert not verdict.kept and verdict.disturbed and "timing disturbed" in verdict.describe()
    decide(_items(), opts, cache, lines.append)
    assert len(clock.calls) == 4  # nothing was stored to replay
    clock = FakeClock(busy, QUICK)  # quiet the second time: that run decides, and is stored
    monkeypatch.setattr(build_timing, "time_bundles", clock)
    assert decide(_items(), opts, cache, lines.append).kept and decide(_items(), opts, cache, lines.append).cached


def test_the_table_never_shows_a_kept_mix_slower_than_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitdeploy.runtimes import bundle as bundles

    mix = Int8Mix(engine="onnxruntime", float_layers=["root.conv"], candidates=[Candidate(name="+ root", chosen=1)])
    kept = row("onnx-int8", top1=0.9, timing=_timing(1.1, 1.0, 1.2), bundle=str(tmp_path / "onnx-int8"))
    kept.manifest = replace(kept.manifest, int8_mix=mix)
    fp32 = row("onnx-fp32", top1=0.9, timing=_timing(1.0, 0.9, 1.1), bundle=str(tmp_path / "onnx-fp32"))
    amended: list[dict[str, Any]] = []

    def amend(path: Path, **changes: Any) -> Manifest:
        amended.append({"path": Path(path).name, **changes})
        target = kept if Path(path).name == "onnx-int8" else fp32
        assert target.manifest is not None
        return replace(target.manifest, **changes)

    monkeypatch.setattr(bundles, "amend_manifest", amend)
    todo = [(r, Timed(r.name, Path(f"{r.name}.onnx"), Manifest(), "cpu", 32)) for r in (kept, fp32)]
    still_slower = {"onnx-int8": _timing(1.2, 1.1, 1.3), "onnx-fp32": _timing(1.0, 0.95, 1.05)}
    monkeypatch.setattr(build_timing, "time_bundles", FakeClock(still_slower))
    build_timing.hold_kept_mixes(todo, BuildOptions(model="tiny", out=tmp_path), lambda _line: None)
    assert kept.timing.p50_ms == 1.2 and fp32.timing.p50_ms == 1.0  # both rows show the figures that decided
    assert not kept.valid and "not faster than ONNX Runtime FP32 in this build's timing" in (kept.error or "")
    assert any(a.get("valid") is False for a in amended if a["path"] == "onnx-int8")
    # a kept mix the second timing shows faster stays valid, with those figures
    kept2 = row("onnx-int8", top1=0.9, timing=_timing(1.1, 1.0, 1.2), bundle=str(tmp_path / "onnx-int8"))
    kept2.manifest = replace(kept2.manifest, int8_mix=mix)
    kept = kept2
    todo = [(r, Timed(r.name, Path(f"{r.name}.onnx"), Manifest(), "cpu", 32)) for r in (kept2, fp32)]
    faster_now = {"onnx-int8": _timing(0.7, 0.6, 0.8), "onnx-fp32": _timing(1.0, 0.95, 1.05)}
    monkeypatch.setattr(build_timing, "time_bundles", FakeClock(faster_now))
    build_timing.hold_kept_mixes(todo, BuildOptions(model="tiny", out=tmp_path), lambda _line: None)
    assert kept2.valid and kept2.timing.p50_ms == 0.7
