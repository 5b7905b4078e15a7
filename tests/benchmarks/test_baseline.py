"""The PyTorch baselines: three labelled forms of the same model, torch.compile bounded in a child process."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bitdeploy.benchmarks import baseline  # noqa: E402

QUICK = {
    "kind": "quick",
    "kwargs": {"iterations": 3, "warmup": 1, "throughput_batches": [1, 2, 4], "throughput_images": 4},
}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training.bit import create_model

    torch.manual_seed(0)
    return create_model(get_variant("tiny"), 10).eval()


def test_folded_form_is_the_same_function_without_standardisation(tiny: torch.nn.Module) -> None:
    from bitdeploy.training.bit import StdConv2d

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    ref = baseline.PytorchBaseline(baseline.prepare(tiny, "eager-ws"), "eager-ws")
    folded = baseline.PytorchBaseline(baseline.prepare(tiny, "eager-folded"), "eager-folded")
    np.testing.assert_allclose(folded.infer(x), ref.infer(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, StdConv2d) for m in ref.module.modules())
    assert not any(isinstance(m, StdConv2d) for m in folded.module.modules())
    assert any(isinstance(m, StdConv2d) for m in tiny.modules())  # folding copies; the model is untouched
    assert folded.describe()["label"] == baseline.LABELS["eager-folded"] and folded.describe()["form"] == "eager-folded"


def test_eager_forms_are_timed_with_a_batch_sweep(tiny: torch.nn.Module) -> None:
    out = baseline.measure_forms(tiny, (3, 32, 32), QUICK, forms=("eager-ws", "eager-folded"))
    assert [r["form"] for r in out] == ["eager-ws", "eager-folded"]
    for r in out:
        assert r["status"] == "valid" and r["label"] == baseline.LABELS[r["form"]]
        assert r["measured"]["n"] == 3 and r["measured"]["p50_ms"] > 0
        assert [t["batch_size"] for t in r["measured"]["throughput"]] == [1, 2, 4]


def test_compile_past_its_bound_is_a_labelled_skip_not_a_crash(tiny: torch.nn.Module) -> None:
    (r,) = baseline.measure_forms(tiny, (3, 32, 32), QUICK, forms=("compiled-folded",), compile_timeout=0.01)
    assert r["status"] == "skipped: torch.compile did not finish within 0.01 s (the compile-time bound)"
    assert r["measured"] is None and r["label"] == baseline.LABELS["compiled-folded"]


def test_timed_batch_sizes() -> None:
    assert baseline.timed_batch_sizes(QUICK) == [1, 2, 4]
    assert baseline.timed_batch_sizes({"kind": "bench", "options": {"batch_sizes": (8, 32), "scenario": "both"}}) == [
        1,
        8,
        32,
    ]
    assert baseline.timed_batch_sizes(
        {"kind": "bench", "options": {"batch_sizes": (8,), "scenario": "single-stream"}}
    ) == [1]
