"""Fixtures of the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.faults import build_args


@pytest.fixture(scope="session")
def clean_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fault tests' build run once, never interrupted: (its --out, its stage cache)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from bitdeploy.cli import main

    base = tmp_path_factory.mktemp("clean")
    try:
        main(build_args(base / "out", base / "cache"))
    except SystemExit as exc:
        assert not exc.code, "the clean build failed"
    return base / "out", base / "cache"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose head is fitted in closed form on digits features at 32 px, saved as a bitdeploy checkpoint:
    ~0.9 validation top-1 in seconds, so the gate has something to lose."""
    import numpy as np

    torch = pytest.importorskip("torch")
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training import checkpoint
    from bitdeploy.training.bit import create_model
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.datasets import load_dataset

    torch.manual_seed(0)
    model = create_model(get_variant("tiny"), 10).eval()
    splits = load_dataset("digits")
    x, y = eval_batch(splits.train, 32)
    with torch.no_grad():
        h = model.head
        feats = h.avg(h.relu(h.gn(model.body(model.root(torch.from_numpy(x)))))).flatten(1).double().numpy()
    mu = feats.mean(0)
    xc = feats - mu
    gram = xc.T @ xc
    w = np.linalg.solve(gram + 1e-2 * np.trace(gram) / len(gram) * np.eye(len(gram)), xc.T @ (np.eye(10)[y] - 0.1))
    with torch.no_grad():
        h.conv.weight.copy_(torch.from_numpy(w.T.reshape(10, -1, 1, 1)).float())
        h.conv.bias.copy_(torch.from_numpy(-(mu @ w)).float())
    out = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(
        out,
        {
            "model_name": "tiny",
            "num_classes": 10,
            "labels": splits.classes,
            "resolution": 32,
            "step": 0,
            "model": model.state_dict(),
        },
    )
    return out
