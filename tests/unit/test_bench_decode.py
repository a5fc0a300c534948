"""scripts/benchkit: the decode benchmark's records are realistic, and the tables render."""
from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from benchkit import decodebench, table  # noqa: E402
from conntrace import decode as d  # noqa: E402


def test_bench_records_decode_to_the_reasons_they_stand_for():
    records = decodebench.mix(peers=2)
    reasons = [d.decode_record(r).reason for r in records]
    assert reasons[:5] == ["SEQ_OVER", "SACK_OVER", "SEQ_OVER", "INVALID_STATE", "BAD_FLAGS"]
    ev = d.decode_record(records[0])
    assert ev.saddr == "10.213.0.1" and ev.daddr == "10.213.0.2" and ev.bound == 70000
    assert d.decode_record(records[2]).family == 6


def test_bench_run_reports_every_stage():
    res = decodebench.run(seconds=0.02)
    assert set(res["stages"]) == {"parse", "decode", "json", "table"}
    assert all(st["events_per_s"] > 0 for st in res["stages"].values())


def test_tables_render_partial_results():
    res = {"kernel_class": "6.1", "decode": decodebench.run(seconds=0.01),
           "guest": {"kernel": "6.1.0-56-amd64", "phases": {
               "throughput": {"variants": {"base": {"n": 2, "median": 100.0, "min": 99, "max": 101,
                                                    "spread_pct": 2.0, "ratio": 1.0, "ratio_per_rep": {}},
                                           "control": {"n": 2, "median": 100.0, "min": 100, "max": 100,
                                                       "spread_pct": 0.0, "ratio": 1.002,
                                                       "ratio_per_rep": {"min": 0.995, "max": 1.01}},
                                           "trace": {"n": 2, "median": 99.5, "min": 99, "max": 100,
                                                     "spread_pct": 1.0, "ratio": 0.995, "ratio_per_rep": {}}}},
               "capacity": {"top": {"floods": [{"rate_asked": 0, "rate_achieved": 5000.0, "injected": 10,
                                                "ct_invalid_delta": 10, "reported": 10, "lost": None,
                                                "tool_cpu_seconds": 0.1, "exact": True}]},
                            "trace": {"error": "boom"}}}}}
    text = table.render(res)
    assert "conntrace trace" in text and "0.995" in text and "FAILED: boom" in text
    marks = {name: ok for name, ok, _ in table.targets(res)}
    assert marks["throughput with conntrace trace ≥ 0.99 of baseline"] is True
    assert marks["top exact at the highest rate"] is True
    assert marks["trace: reported + lost == injected at every rate"] is None
    res["guest"]["phases"]["throughput"]["variants"]["control"]["ratio"] = 1.2     # noisy machine
    marks = {name: ok for name, ok, _ in table.targets(res)}
    assert marks["throughput with conntrace trace ≥ 0.99 of baseline"] is None
