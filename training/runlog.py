"""What a training run tells its user: a header on stderr, `DIR/metrics.jsonl`, and `DIR/summary.json`.

Only the main process writes. On resume, metrics past the checkpoint's step (written by the killed run
after its last checkpoint) are dropped, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bitdeploy.core.fsutil import atomic_write

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    path = out / SUMMARY
    atomic_write(path, json.dumps(summary, indent=2, default=str) + "\n")
    return path


class RunLog:
    def __init__(self, out: Path, main: bool, start_step: int) -> None:
        self.out, self.main = out, main
        self.path = out / METRICS
        if not main:
            return
        kept: list[str] = []
        if start_step > 0 and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= start_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue  # a line cut by the kill
        atomic_write(self.path, "".join(k + "\n" for k in kept))
        if start_step == 0:
            (out / SUMMARY).unlink(missing_ok=True)

    def metric(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, message: str) -> None:
        if self.main:
            click.echo(message)

    def note(self, message: str) -> None:
        if self.main:
            click.echo(message, err=True)

    def start(self, plan: dict[str, Any], splits: Any, in_memory: bool, resumed: bool, config: Any) -> None:
        if not self.main:
            return
        self.metric({"event": "resume" if resumed else "start", "step": 0, "plan": plan})
        rule = plan["rule"]
        self.note(
            f"{config.model} on {splits.name}: {len(splits.train)} train / {len(splits.val)} val images, {len(splits.classes)} classes; "
            f"{plan['steps']} steps (rule {rule['steps']}), batch {plan['batch_size']} (rule {rule['batch_size']}) = {plan['world_size']} process(es) "
            f"x {plan['batch_split']} micro-batch(es) of {plan['micro_batch']}, peak lr {plan['base_lr']:.6g}, {plan['resize']}->{plan['crop']}px, "
            f"mixup {plan['mixup_alpha']:g}, training set {'in memory' if in_memory else 'decoded per batch'}"
        )
        for n in list(plan["notes"]) + list(splits.notes):
            self.note(f"  note: {n}")
        if splits.skipped:
            self.note(
                f"  skipped {len(splits.skipped)} unreadable image(s), e.g. {splits.skipped[0]} (use --strict to stop instead)"
            )
        if resumed:
            self.note(f"  resuming from {self.out / 'checkpoint.pt'}")
        sys.stderr.flush()
