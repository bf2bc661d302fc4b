"""Worker processes relay every Progress event, its ``info`` included (issue 11's one
Progress type: a worker that dropped ``info`` made `supermerge demo --workers 2` fail)."""

from __future__ import annotations

from supermerge.eval.parallel import run_jobs


def _count(name: str, steps: int, *, progress) -> str:
    for step in range(1, steps + 1):
        progress(f"job {name}", step, steps, {"loss": float(step)} if step == steps else None)
    return name.upper()


def test_two_workers_return_results_in_order_and_relay_progress_with_info():
    events = []
    results = run_jobs(_count, [("a", 2), ("b", 3)], workers=2,
                       progress=lambda *event: events.append(event))
    assert results == ["A", "B"]
    assert ("job a", 1, 2) in events and ("job b", 2, 3) in events
    assert ("job a", 2, 2, {"loss": 2.0}) in events and ("job b", 3, 3, {"loss": 3.0}) in events
