"""The restore's background writeback: it syncs while the block runs and stops with it, whatever happens."""

from __future__ import annotations

import time

import pytest

from workers.engines.postgresql import writeback


def test_it_syncs_while_the_block_runs_and_stops_with_it(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(writeback.os, "sync", lambda: calls.append(time.monotonic()))
    with writeback.written_back_meanwhile(pause=0.01) as thread:
        time.sleep(0.2)
    assert len(calls) >= 5
    assert not thread.is_alive()
    settled = len(calls)
    time.sleep(0.05)
    assert len(calls) == settled  # no sync after the block


def test_a_failing_block_stops_it_too_and_its_error_comes_through(monkeypatch) -> None:
    monkeypatch.setattr(writeback.os, "sync", lambda: None)
    with pytest.raises(RuntimeError, match="layout failed"):
        with writeback.written_back_meanwhile(pause=0.01) as thread:
            raise RuntimeError("layout failed")
    assert not thread.is_alive()
