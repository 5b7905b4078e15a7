"""BiT-HyperRule: buckets, schedule (with Google's `s < step` quirk), resolution, mixup, overrides."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from bitdeploy.training import hyperrule as hr


@pytest.mark.parametrize(
    ("size", "bucket"), [(1, "small"), (19_999, "small"), (20_000, "medium"), (499_999, "medium"), (500_000, "large")]
)
def test_buckets(size: int, bucket: str) -> None:
    assert hr.bucket(size) == bucket
    assert hr.get_mixup(size) == (0.0 if bucket == "small" else 0.1)


def test_schedules_match_google() -> None:
    assert hr.get_schedule(1000) == [100, 200, 300, 400, 500]
    assert hr.get_schedule(50_000) == [500, 3000, 6000, 9000, 10_000]
    assert hr.get_schedule(1_281_167) == [500, 6000, 12_000, 18_000, 20_000]


def test_lr_warmup_and_decay_boundary_quirk() -> None:
    base = 0.003
    assert hr.get_lr(0, 1000) == 0.0
    assert hr.get_lr(50, 1000) == pytest.approx(base / 2)
    assert hr.get_lr(100, 1000) == pytest.approx(base)
    # `s < step`: the drop takes effect one step after each boundary.
    assert hr.get_lr(200, 1000) == pytest.approx(base)
    assert hr.get_lr(201, 1000) == pytest.approx(base / 10)
    assert hr.get_lr(300, 1000) == pytest.approx(base / 10)
    assert hr.get_lr(301, 1000) == pytest.approx(base / 100)
    assert hr.get_lr(401, 1000) == pytest.approx(base / 1000)
    assert hr.get_lr(499, 1000) == pytest.approx(base / 1000)
    assert hr.get_lr(500, 1000) is None
    assert hr.get_lr(3000, 50_000) == pytest.approx(base)
    assert hr.get_lr(3001, 50_000) == pytest.approx(base / 10)
    assert hr.get_lr(9999, 50_000) == pytest.approx(base / 1000)
    assert hr.get_lr(10_000, 50_000) is None


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((8, 8), (160, 128)),
        ((32, 32), (160, 128)),
        ((95, 96), (160, 128)),
        ((96, 96), (512, 480)),
        ((40, 40), (160, 128)),
        ((300, 300), (512, 480)),
        ((224, 224), (512, 480)),
    ],
)
def test_resolution_by_area(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert hr.get_resolution(hw) == expected


def test_scale_schedule_keeps_fractions_and_order() -> None:
    assert hr.scale_schedule([100, 200, 300, 400, 500], 600) == [120, 240, 360, 480, 600]
    assert hr.scale_schedule([500, 3000, 6000, 9000, 10_000], 1000) == [50, 300, 600, 900, 1000]
    tiny = hr.scale_schedule([100, 200, 300, 400, 500], 3)
    assert tiny[-1] == 3 and tiny == sorted(tiny)


def test_plan_digits_is_the_rule() -> None:
    plan = hr.make_plan(1438, 10, (8, 8))
    assert (plan["steps"], plan["warmup_steps"], plan["lr_decay_steps"]) == (500, 100, [200, 300, 400])
    rule = dict(base_lr=0.003, batch_size=512, resize=160, crop=128, mixup_alpha=0.0)
    assert {k: plan[k] for k in rule} == rule
    assert plan["overrides"] == {} and plan["notes"] == []
    assert plan["momentum"] == 0.9 and plan["weight_decay"] == 0.0 and plan["zero_head"] is True
    json.dumps(plan)


@pytest.mark.parametrize(("hw", "resize", "crop"), [((40, 40), 160, 128), ((300, 300), 512, 480)])
def test_plan_25k_images(hw: tuple[int, int], resize: int, crop: int) -> None:
    plan = hr.make_plan(25_000, 10, hw)
    assert (plan["steps"], plan["warmup_steps"], plan["lr_decay_steps"]) == (10_000, 500, [3000, 6000, 9000])
    assert plan["mixup_alpha"] == 0.1
    assert (plan["resize"], plan["crop"]) == (resize, crop)


def test_batch_override_scales_lr_and_says_so() -> None:
    plan = hr.make_plan(1438, 10, (8, 8), batch_size=64)
    assert plan["base_lr"] == pytest.approx(0.003 * 64 / 512)
    assert plan["overrides"]["base_lr"] == {"rule": 0.003, "value": plan["base_lr"]}
    assert plan["overrides"]["batch_size"] == {"rule": 512, "value": 64}
    assert any("scaled linearly" in n for n in plan["notes"])


def test_lr_override_is_used_as_is() -> None:
    plan = hr.make_plan(1438, 10, (8, 8), batch_size=64, lr=0.1, steps=600, resolution=32, mixup=0.2)
    assert plan["base_lr"] == 0.1
    assert plan["schedule"] == [120, 240, 360, 480, 600]
    assert (plan["resize"], plan["crop"]) == (40, 32)
    assert plan["mixup_alpha"] == 0.2
    assert plan["rule"]["crop"] == 128 and plan["rule"]["steps"] == 500
    overridden = {"steps", "warmup_steps", "lr_decay_steps", "base_lr"} | {
        "batch_size",
        "resize",
        "crop",
        "mixup_alpha",
    }
    assert set(plan["overrides"]) == overridden
    assert len(plan["notes"]) == 4


def test_no_hflip_is_an_override() -> None:
    plan = hr.make_plan(1438, 10, (8, 8), hflip=False)
    assert plan["hflip"] is False and plan["rule"]["hflip"] is True
    assert plan["overrides"] == {"hflip": {"rule": True, "value": False}} and len(plan["notes"]) == 1


def test_resolution_override_keeps_large_ratio() -> None:
    plan = hr.make_plan(1000, 5, (300, 300), resolution=224)
    assert (plan["resize"], plan["crop"]) == (239, 224)


def test_mixup_lambda() -> None:
    assert hr.mixup_lambda(0.0, random.Random(0)) == 1.0
    lams = [hr.mixup_lambda(0.1, random.Random(i)) for i in range(50)]
    assert all(0.0 <= x <= 1.0 for x in lams) and len(set(lams)) > 40


def test_planning_is_torch_free() -> None:
    code = "import sys; import bitdeploy.training.hyperrule, bitdeploy.training.planner, bitdeploy.cli.cmd_train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
