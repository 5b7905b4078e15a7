"""Parity of `bitdeploy export` with Google's official BiT PyTorch code (docs/models.md).

For official-format `.npz` files (Google's key names, random weights, each head size asked for), runs the real
CLI, `bitdeploy export --model M --weights FILE.npz --resolution R --out m.onnx`, then compares the file's
logits in ONNX Runtime with the official model (a transcription of `bit_pytorch/models.py`, kept in the source
tree at tests/reference/official_bit.py) on inputs uniform in [-1, 1]. Also checks that every Conv weight in
the exported graph is an initializer.

    python benchmarks/experiments/parity_official.py [--model m-r50x1] [--heads 21843,10] [--resolutions 128,224]

Exit status 1 when any case exceeds --atol or disagrees on a top-1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_ORACLE = Path(__file__).resolve().parents[2] / "tests" / "reference" / "official_bit.py"


def load_oracle(path: Path) -> ModuleType:
    if not path.is_file():
        sys.exit(f"error: the official-code oracle {path} is missing; run from a source checkout or pass --oracle PATH")
    spec = importlib.util.spec_from_file_location("official_bit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(oracle: ModuleType, model: str, npz: Path, res: int, batch: int, work: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    from bitdeploy.converters.onnx_export import check_graph
    from bitdeploy.core.catalog import get_variant

    out = work / f"{model}-{npz.stem}-{res}.onnx"
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitdeploy",
            "export",
            "--model",
            model,
            "--weights",
            str(npz),
            "--resolution",
            str(res),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    export_s = time.perf_counter() - started
    if proc.returncode != 0:
        return {"resolution": res, "ok": False, "error": proc.stderr.strip()[-300:]}
    v = get_variant(model)
    official = oracle.from_npz(str(npz), v.block_units, v.width_factor)
    x = np.random.default_rng(res).uniform(-1.0, 1.0, (batch, 3, res, res)).astype(np.float32)
    with torch.no_grad():
        expected = official(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    graph = onnx.load(str(out), load_external_data=False)
    head = int(expected.shape[1])
    try:
        check_graph(graph, res, head, 17)
        structure = "ok"
    except Exception as exc:  # reported, not raised: the table shows every case
        structure = str(exc)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    inits = {i.name for i in graph.graph.initializer}
    return {
        "head": head,
        "resolution": res,
        "batch": batch,
        "max_abs_diff": float(np.abs(got - expected).max()),
        "max_abs_logit": float(np.abs(expected).max()),
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
        "conv_weights_initializers": f"{sum(n.input[1] in inits for n in convs)}/{len(convs)}",
        "structure": structure,
        "nodes": len(graph.graph.node),
        "export_seconds": round(export_s, 1),
        "ok": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="m-r50x1")
    parser.add_argument("--heads", default="21843,10", help="comma-separated head sizes of the generated npz files")
    parser.add_argument("--resolutions", default="128,224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--oracle", type=Path, default=DEFAULT_ORACLE)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    oracle = load_oracle(args.oracle)
    from bitdeploy.core.catalog import get_variant

    v = get_variant(args.model)
    results = []
    with tempfile.TemporaryDirectory(prefix="bitdeploy-parity-") as tmp:
        work = Path(tmp)
        for head in (int(h) for h in args.heads.split(",")):
            npz = work / f"random-head{head}.npz"
            oracle.random_npz(str(npz), v.block_units, v.width_factor, head_size=head, seed=head)
            for res in (int(r) for r in args.resolutions.split(",")):
                row = {"model": args.model, "head": head, **run_case(oracle, args.model, npz, res, args.batch, work)}
                row["passed"] = bool(
                    row["ok"]
                    and row["max_abs_diff"] <= args.atol
                    and row["top1_agreement"] == 1.0
                    and row["structure"] == "ok"
                )
                results.append(row)
                print(json.dumps(row), flush=True)
            npz.unlink()
    print(
        f"\n{'model':10} {'head':>6} {'res':>4} {'max|diff|':>10} {'max|logit|':>10} {'top1 agree':>10} {'conv W init':>11} {'nodes':>5} {'export s':>8}  result"
    )
    for r in results:
        if not r["ok"]:
            print(f"{r['model']:10} {r['head']:>6} {r['resolution']:>4}  export failed: {r['error']}")
            continue
        print(
            f"{r['model']:10} {r['head']:>6} {r['resolution']:>4} {r['max_abs_diff']:>10.2e} {r['max_abs_logit']:>10.3g} {r['top1_agreement']:>10.0%} {r['conv_weights_initializers']:>11} {r['nodes']:>5} {r['export_seconds']:>8}  {'PASS' if r['passed'] else 'FAIL'}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
