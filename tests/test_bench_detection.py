"""benchmarks/bench_detection.py keeps working (its figures are read by hand; this only checks it runs and what it
returns is consistent): tiny RetinaNet pair, small images, one repeat."""

import math

from benchmarks.bench_detection import run


def test_bench_detection_runs_and_reports_ratios():
    lines = []
    res = run("retinanet_resnet18_fpn", "retinanet_resnet18_fpn", size=64, batch=1, repeats=1, methods=["baseline", "cwd"],
              fpn_channels=32, num_classes=3, log=lines.append)
    assert set(res["ratios"]) == {"baseline", "cwd", "cwd-dwt"}
    assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
    assert res["min_s"]["teacher_fpn"] <= res["median_s"]["teacher_fpn"]
    assert -1.0 < res["fpn_saving"] < 1.0
    assert any("ratio" in line for line in lines)
