"""The INT8 search's speed decision, and the table's guard on it.

A mix is kept only when it is faster than the same engine's FP32 by more than the spread of both: its slowest
round's p50 below FP32's fastest round's p50 (`timing.faster`), from `timing.DECISION_ROUNDS` interleaved rounds of the mix, uniform INT8 and
FP32 in one run (`timing.decisive` through `time_bundles`, the build's one timing path; a run the machine disturbed
is measured again, after waiting for quiet with `--quiet-check wait`). A decision from an undisturbed run is stored in the stage cache,
keyed by the three bundles' cache keys and this host, so a rebuild gives the same verdict without timing again.

The build's table times the bundles once more (`timing.time_rows`), and `timing.hold_kept_mixes` makes sure it never
shows a kept mix slower than its engine's FP32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.timing import DECISION_ROUNDS, Timed, decisive, faster
from bitdeploy.core.cache import StageCache, stage_key

FP32, UNIFORM, MIX = "fp32", "uniform INT8", "mix"
RULE = "kept when its slowest round's p50 is below FP32's fastest round's"


@dataclass(frozen=True)
class SpeedVerdict:
    kept: bool
    p50: dict[str, float | None]  # FP32, UNIFORM, MIX -> batch-1 p50 (median of the rounds)
    spread: dict[str, tuple[float, float] | None]  # the same -> [fastest, slowest] round
    rounds: int
    disturbed: tuple[str, ...] = ()
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "p50": dict(self.p50),
            "spread": {k: list(v) if v else None for k, v in self.spread.items()},
            "rounds": self.rounds,
            "disturbed": list(self.disturbed),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], cached: bool = False) -> SpeedVerdict:
        spread = {k: (float(v[0]), float(v[1])) if v else None for k, v in dict(data["spread"]).items()}
        return cls(bool(data["kept"]), dict(data["p50"]), spread, int(data["rounds"]), tuple(data["disturbed"]), cached)

    def describe(self) -> str:
        """ "p50 0.43 ms [0.41-0.45] vs uniform INT8 0.46 ms and FP32 0.55 ms [0.52-0.60], 5 rounds"."""

        def ms(name: str) -> str:
            p50, spread = self.p50.get(name), self.spread.get(name)
            bounds = f" [{spread[0]:.2f}-{spread[1]:.2f}]" if spread else ""
            return f"{p50:.2f} ms{bounds}" if p50 is not None else "not timed"

        noted = " (cached)" if self.cached else ""
        noisy = f"; timing disturbed: {self.disturbed[0]}" if self.disturbed else ""
        return f"p50 {ms(MIX)} vs uniform INT8 {ms(UNIFORM)} and FP32 {ms(FP32)}, {self.rounds} rounds{noted}{noisy}"


def decide(
    items: dict[str, tuple[Timed, str]], opts: BuildOptions, cache: StageCache, log: Callable[[str], None]
) -> SpeedVerdict:
    """Keep the mix or not, from the cache or a fresh interleaved run. `items`: FP32, UNIFORM, MIX -> (what to time,
    its stage-cache key)."""
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    cpu = host_fingerprint()["cpu"]
    host = {"model": cpu.get("model"), "class": cpu.get("class"), "arch": cpu.get("arch")}
    settings = {"threads": opts.engine.threads, "rounds": DECISION_ROUNDS, "queries": opts.timing.bench_iterations}
    device = items[MIX][0].device
    key = stage_key(
        "int8-speed", {name: k for name, (_, k) in items.items()}, {**settings, "host": host, "device": device}
    )
    found = cache.lookup("int8-speed", key)
    if found is not None:
        cache.hits.append("int8-speed")
        log(f"cache hit: INT8 search speed decision (int8-speed/{key[:12]})")
        return SpeedVerdict.from_dict(found[1]["meta"], cached=True)
    names = list(items)
    timings = dict(zip(names, decisive([items[n][0] for n in names], opts, log)))
    disturbed = tuple(r for t in timings.values() if t is not None for r in t.disturbed)
    kept = faster(timings[MIX], timings[FP32]) and not (disturbed and opts.timing.quiet_check == "fail")
    verdict = SpeedVerdict(
        kept,
        {n: t.p50_ms if t is not None else None for n, t in timings.items()},
        {n: t.p50_spread if t is not None else None for n, t in timings.items()},
        DECISION_ROUNDS,
        disturbed,
    )
    if not disturbed:  # a decision from a busy machine is not one to replay
        cache.run("int8-speed", key, lambda _out: verdict.to_dict(), what="INT8 search speed decision")
    return verdict
