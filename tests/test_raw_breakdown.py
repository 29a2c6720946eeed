"""The raw path's breakdown run tiny against a real Triton and Redis: every part reported, no timings checked."""

from __future__ import annotations

import subprocess

import pytest

from bench.raw_breakdown import (
    EXECUTE,
    HEALTH,
    IDENTITY,
    LUA,
    PING,
    SUM_PARTS,
    WHOLE,
    BreakdownSettings,
    run_breakdown,
)
from bench.settings import RawBenchSpec
from export.triton_config import ServingSettings

IN_PROCESS = ("a decode", "b history features", "c ORT session.run", EXECUTE)
REST = "  rest of execute (execute - a - b - c)"


@pytest.mark.triton
@pytest.mark.slow
def test_breakdown_reports_every_part_at_both_batch_sizes(tmp_path):
    before = set(subprocess.run(["pgrep", "-f", "treeops-bench-"], capture_output=True, text=True).stdout.split())
    settings = BreakdownSettings(raw=RawBenchSpec(rows=5000, trees=20, depth=4), serving=ServingSettings(
        max_batch_size=64, instance_count=1), calls=20, warmup=5, batch=3)
    result = run_breakdown(settings, tmp_path)
    now = set(subprocess.run(["pgrep", "-f", "treeops-bench-"], capture_output=True, text=True).stdout.split())
    assert not (now - before), "the breakdown left a tritonserver (or stub) running"

    got = {(p.name, p.requests) for p in result.parts}
    expected = {(HEALTH, 0), (IDENTITY, 1), (WHOLE, 1), (PING, 0), (LUA, 0), ("compiled forest", 1),
                ("compiled forest", 3), *((name, n) for name in (*IN_PROCESS, REST) for n in (1, 3))}
    assert got == expected
    for p in result.parts:
        if p.name != REST:  # a difference of medians: its sign is a timing
            assert p.p50_us > 0, p
    for n in (1, 3):
        assert result.us(REST, n) == pytest.approx(result.us(EXECUTE, n) - sum(result.us(name, n)
                                                                               for name in IN_PROCESS[:3]))
    assert result.estimate_c_us(3) == pytest.approx(result.us(HEALTH, 0) + result.us(PING, 0) + 3 * result.us(LUA, 0)
                                                    + result.us("compiled forest", 3))
    assert 1 <= result.trees <= 20 and result.calls == 20 and result.load.startswith("load average")

    text = "\n".join(result.lines())
    for name in (*SUM_PARTS, WHOLE, HEALTH, PING.strip(), LUA.strip(), "(a)+(b)+(c)+(d)",
                 "ESTIMATE (not measured), C backend + hiredis, 1 row(s)", "3 row(s)"):
        assert name in text, (name, text)
    assert set(result.to_dict()) == {"parts", "trees", "calls", "load"}
