"""The merged/batched mode policy (a pure function) and its hysteresis."""

from __future__ import annotations

from flora_server.engine.policy import ModeDecision, choose_mode, merge_pays, update_streak


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


def test_merge_pays_only_for_enough_remaining_work() -> None:
    """Rule 4c: a merge costing 348 row-tokens of per-row work (SmolLM2-135M, all seven
    projections: 3,538,944 * r vs 10,176 * r multiply-adds per layer) pays back only when
    the rows' remaining budgets add up to that many tokens."""
    cost = (3_538_944 * 8, 10_176 * 8)
    assert merge_pays([348], cost)
    assert not merge_pays([347], cost)
    assert merge_pays([11] * 32, cost)  # 352 row-tokens
    assert not merge_pays([10] * 32, cost)  # 320
    assert merge_pays([400, -5], (400, 1))  # a negative budget counts as 0
    assert not merge_pays([399, -5], (400, 1))
    assert not merge_pays([0, 0], (1, 1))


def test_a_merge_that_does_not_pay_keeps_the_batch_batched() -> None:
    asked = []

    def pays(adapter):
        asked.append(adapter)
        return False

    decision = choose_mode(["x", "x"], [], None, 10, merge_after_steps=4, pays=pays)
    assert decision == ModeDecision("batched", None) and asked == ["x"]
    # asked last: a streak too short, or a waiting request for another adapter, decide first
    assert choose_mode(["x"], [], None, 1, merge_after_steps=4, pays=pays).mode == "batched"
    assert choose_mode(["x"], ["y"], None, 9, merge_after_steps=4, pays=pays).mode == "batched"
    assert asked == ["x"]
    # an adapter already merged stays merged (the merge is paid)
    assert choose_mode(["x"], [], "x", 1, pays=pays) == ModeDecision("merged", "x")
