"""The parts of gpu_check.py that need no GPU and no torch: rows, tolerances, the comparison, the synthetic
dataset, module checks, the build figures, and the JSON + Markdown summary."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("passed", "failed", "skipped")


@dataclass
class Row:
    name: str
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        return cls(str(d["name"]), str(d["status"]), float(d.get("seconds", 0.0)), dict(d.get("figures", {})),
                   str(d.get("reason", "")))  # fmt: skip


@dataclass(frozen=True)
class Tolerance:
    """Bounds of a device run against the CPU fp32 run of the same steps from the same weights and batches."""

    loss: float  # max over steps of |loss - cpu loss|, in nats
    logits: float  # max |logit - cpu logit| / max |cpu logit|: the CPU's trained weights, forward on the device
    why: str


# Sized on CPU proxies (x86-64 AVX-512 VNNI + BF16, AMD EPYC, 2 cores, torch 2.13, m-r50x1 at 64 px, 8 steps of
# batch 16 from a zero head): the same fp32 run with channels_last instead of NCHW input (other kernels and
# summation order) moved the loss curve by 8.3e-4 nats and the logits by 5.8e-6 of their scale; bf16 autocast
# against fp32 moved them by 3.0e-3 nats and 3.2e-2. A wrong layout, a missing weight standardisation or a broken
# kernel is O(1) on the logits. docs/development.md, "When a GPU is available", has the command.
TOLERANCES: dict[str, Tolerance] = {
    "fp32-ieee": Tolerance(
        1e-2, 1e-3, "fp32 on both sides (TF32 off): only kernels and summation order differ; 12x and 170x the CPU's"
    ),
    "fp32-default": Tolerance(
        2e-2, 2e-2, "torch's CUDA default runs fp32 convolutions in TF32 (unit roundoff 4.9e-4, 8x finer than bf16)"
    ),
    "bf16": Tolerance(3e-2, 1e-1, "bf16 autocast (unit roundoff 3.9e-3): 10x and 3x what bf16 on the CPU moved"),
}


def compare(
    ref_losses: Sequence[float], losses: Sequence[float], ref_logits: Any, logits: Any, tol: Tolerance
) -> tuple[bool, dict[str, Any], str]:
    """(within tolerance, figures, reason when not) for one device run against the CPU reference."""
    ref_l, got_l = np.asarray(ref_losses, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    ref_z, got_z = np.asarray(ref_logits, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    if ref_l.shape != got_l.shape or ref_z.shape != got_z.shape:
        reason = f"shapes differ: losses {ref_l.shape} vs {got_l.shape}, logits {ref_z.shape} vs {got_z.shape}"
        return False, {}, reason
    finite = bool(np.isfinite(got_l).all() and np.isfinite(got_z).all())
    scale = float(np.abs(ref_z).max()) if ref_z.size else 0.0
    loss_diff = float(np.abs(got_l - ref_l).max()) if ref_l.size else 0.0
    logit_diff = float(np.abs(got_z - ref_z).max()) if ref_z.size else 0.0
    rel = logit_diff / scale if scale > 0 else logit_diff
    agree = float((got_z.argmax(-1) == ref_z.argmax(-1)).mean()) if ref_z.size else 1.0
    figures = {
        "loss_max_abs_diff": loss_diff,
        "logits_max_abs_diff": logit_diff,
        "logits_scale": scale,
        "logits_rel_diff": rel,
        "top1_agreement": agree,
        "tol_loss": tol.loss,
        "tol_logits_rel": tol.logits,
        "losses": [round(float(v), 6) for v in got_l],
        "cpu_losses": [round(float(v), 6) for v in ref_l],
    }
    if not finite:
        return False, figures, "non-finite loss or logits on the device"
    problems = []
    if not loss_diff <= tol.loss:
        problems.append(f"loss curve differs by {loss_diff:.3g} nats (tolerance {tol.loss:g})")
    if not rel <= tol.logits:
        problems.append(f"logits differ by {rel:.3g} of their scale {scale:.3g} (tolerance {tol.logits:g})")
    return not problems, figures, "; ".join(problems)


def missing_modules(names: Iterable[str]) -> list[str]:
    """The names that cannot be imported here (absent, or blocked with sys.modules[name] = None)."""
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None or has no __spec__
            found = False
        if not found:
            out.append(name)
    return out


def write_image_folder(root: Path, classes: int = 4, train: int = 24, val: int = 8, size: int = 16) -> Path:
    """A small seeded ImageFolder (root/train/<class>/*.png, root/val/...): a class is a stripe direction and
    colour over noise, so a few steps already lower the loss. Needs only Pillow (no scikit-learn, no download)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", train), ("val", val)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = math.pi * k / classes
            wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / 5.0)
            for i in range(count):
                noise = rng.normal(0.0, 0.35, (size, size, 3))
                colour = np.array([(k % 2) * 0.6 + 0.2, ((k // 2) % 2) * 0.6 + 0.2, 0.5])
                img = 0.5 + 0.35 * wave[..., None] * colour + noise * 0.5
                arr = (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root


def bundle_figures(bundle: Path) -> tuple[dict[str, Any], str]:
    """Figures of a built bundle's manifest and, when it is not a valid CUDA bundle, why."""
    path = bundle / "manifest.json"
    if not path.is_file():
        return {}, f"no {path}"
    m = json.loads(path.read_text(encoding="utf-8"))
    v = m.get("validation") or {}
    lat = m.get("build_latency") or {}
    target = m.get("target") or {}
    figures = {
        "valid": m.get("valid"),
        "device": target.get("device"),
        "precision_used": target.get("precision_used"),
        "evaluated_with": v.get("evaluated_with"),
        "max_abs_logit_diff": v.get("max_abs_logit_diff"),
        "tolerance": v.get("tolerance"),
        "agreement": v.get("agreement"),
        "batch1_p50_ms": lat.get("batch1_p50_ms"),
        "images_per_s": lat.get("images_per_s"),
        "export_max_abs_diff": (m.get("export") or {}).get("max_abs_diff"),
    }
    if not m.get("valid"):
        return figures, f"bundle invalid: {m.get('invalid_reason')}"
    if "cuda" not in str(figures["evaluated_with"]).lower() and "cuda" not in str(figures["device"]).lower():
        return figures, f"the gate ran on {figures['evaluated_with']}, not on CUDA"
    return figures, ""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def figures_text(figures: dict[str, Any]) -> str:
    """Scalars only (curves and lists stay in the JSON)."""
    return ", ".join(f"{k}={_cell(v)}" for k, v in figures.items() if not isinstance(v, (list, dict)))


def summary_markdown(rows: Sequence[Row], environment: dict[str, Any], exit_code: int) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    lines = [
        "# gpu_check",
        "",
        *(f"- {k}: {_cell(v)}" for k, v in environment.items()),
        f"- result: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
        f"exit {exit_code}",
        "",
        "| row | status | seconds | figures | reason |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        cells = (r.name, r.status, f"{r.seconds:.1f}", figures_text(r.figures), r.reason)
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: Sequence[Row], environment: dict[str, Any], exit_code: int) -> tuple[Path, Path]:
    """out/gpu_check.json (everything) and out/gpu_check.md (the table); returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment, "exit_code": exit_code, "rows": [r.to_dict() for r in rows]}
    js, md = out / "gpu_check.json", out / "gpu_check.md"
    js.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    md.write_text(summary_markdown(rows, environment, exit_code), encoding="utf-8")
    return js, md
