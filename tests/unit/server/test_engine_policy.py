"""The merged/batched mode policy (a pure function) and its hysteresis."""

from __future__ import annotations

from flora_server.engine.policy import ModeDecision, choose_mode, update_streak


def decide(running, waiting=(), merged=None, streak=10, after=4):
    return choose_mode(running, waiting, merged, streak, merge_after_steps=after)


def test_basic_modes() -> None:
    assert decide([]) == ModeDecision("idle", None)
    assert decide([], merged="x") == ModeDecision("idle", "x")  # stays merged while idle
    assert decide([None, None], merged="x") == ModeDecision("base", None)
    assert decide(["x", "y"]) == ModeDecision("batched", None)
    assert decide(["x", None], merged="x") == ModeDecision("batched", None)
    assert decide(["x", "x"]) == ModeDecision("merged", "x")
    assert decide(["x"], merged="y") == ModeDecision("merged", "x")
    assert decide(["x"], merged="x", streak=1) == ModeDecision("merged", "x")


def test_hysteresis_and_waiting_requests() -> None:
    assert decide(["x"], streak=3) == ModeDecision("batched", None)
    assert decide(["x"], streak=4) == ModeDecision("merged", "x")
    assert decide(["x"], waiting=["y"]) == ModeDecision("batched", None)
    assert decide(["x"], waiting=[None]) == ModeDecision("batched", None)
    assert decide(["x"], waiting=["x"]) == ModeDecision("merged", "x")
    assert decide(["x"], after=None) == ModeDecision("batched", None)


def test_streak_counts_homogeneous_steps() -> None:
    state = (None, 0)
    for running in (["x"], ["x", "x"], ["x"]):
        state = update_streak(*state, running)
    assert state == ("x", 3)
    assert update_streak(*state, ["y"]) == ("y", 1)
    assert update_streak(*state, ["x", None]) == (None, 0)


def test_alternating_stream_does_not_thrash() -> None:
    """Short requests alternating between x and y (3 steps each): never merged."""
    state, merged, switches = (None, 0), None, 0
    for i in range(60):
        running = ["x" if (i // 3) % 2 == 0 else "y"]
        state = update_streak(*state, running)
        decision = choose_mode(running, [], merged, state[1], merge_after_steps=4)
        switches += decision.merge != merged
        merged = decision.merge
    assert switches == 0
