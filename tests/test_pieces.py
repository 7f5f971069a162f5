"""The piece policy, pure: no sockets, files or clocks."""

from __future__ import annotations

import random

import pytest

from p2pshare.pieces import (ENDGAME_COPIES, MAX_WINDOW, RANDOM_START, RUN, WINDOW_BYTES, PiecePicker, choice_for,
                             window_bytes)

MIB = 1024 * 1024


@pytest.mark.parametrize("bandwidth, rtt, expected", [
    (125_000_000, 0.0005, WINDOW_BYTES),  # 1 Gbit/s on a LAN: the floor covers it many times over
    (125_000_000, 0.050, WINDOW_BYTES),  # 1 Gbit/s at 50 ms: 2 x 6.25 MB, still under the floor
    (1_250_000_000, 0.050, 125_000_000),  # 10 Gbit/s at 50 ms: twice bandwidth x delay
    (12_500_000, 2.0, 50_000_000),  # 100 Mbit/s over a satellite hop: 2 x 25 MB
    (10_000_000_000, 1.0, MAX_WINDOW),  # never more than a holder accepts in gets
    (0, 0.0, WINDOW_BYTES),  # nothing measured yet
])
def test_the_window_covers_bandwidth_times_delay(bandwidth: float, rtt: float, expected: int) -> None:
    assert window_bytes(bandwidth, rtt) == expected


def test_one_holder_gets_random_first_pieces_then_runs_in_order() -> None:
    firsts = set()
    for seed in range(20):
        picker = PiecePicker(64 * MIB, MIB, rng=random.Random(seed))
        starts = [picker.claim("a") for _ in range(RANDOM_START)]
        assert all(length == MIB for _, length in starts)
        firsts.add(starts[0][0])
        taken = {offset // MIB for offset, _ in starts}
        offset, length = picker.claim("a")  # a run from the first missing piece, up to RUN bytes
        assert offset // MIB == min(set(range(64)) - taken)
        assert length <= RUN and not taken & set(range(offset // MIB, (offset + length) // MIB))
    assert len(firsts) > 5


def test_a_swarming_download_picks_single_pieces_at_random_by_rank() -> None:
    picker = PiecePicker(32 * MIB, MIB, rng=random.Random(1))
    picker.swarming = True
    rare = {3, 17, 29}
    got = [picker.claim("a", rank=lambda i: 0 if i in rare else 1) for _ in range(3)]
    assert sorted(o // MIB for o, _ in got) == sorted(rare) and all(n == MIB for _, n in got)
    odd = picker.claim("b", has=lambda i: i % 2 == 1)
    assert odd is not None and (odd[0] // MIB) % 2 == 1
    assert picker.claim("c", has=lambda i: False) is None


@pytest.mark.parametrize("piece_size, missing_after, second_copy", [
    (MIB, ENDGAME_COPIES, True),  # the last pieces: a second source may fetch one too
    (8 * MIB, ENDGAME_COPIES, False),  # too large to hold a spare copy in memory
])
def test_endgame_copies_only_for_the_last_small_pieces(piece_size: int, missing_after: int,
                                                       second_copy: bool) -> None:
    picker = PiecePicker(10 * piece_size, piece_size)
    picker.swarming = True
    for i in range(10 - missing_after):
        picker.have[i] = 1
    slow = [picker.claim("slow") for _ in range(missing_after)]
    assert all(slow) and picker.claim("slow") is None
    copy = picker.claim("fast", sources=2)
    assert (copy is not None) == second_copy
    if copy is not None:
        assert copy in slow
        for n in range(5):
            picker.claim(f"other{n}", sources=7)
        assert max(len(c) for c in picker.claims.values()) == ENDGAME_COPIES  # never a third copy


def test_no_endgame_while_many_pieces_are_missing() -> None:
    picker = PiecePicker(10 * MIB, MIB)
    picker.swarming = True
    for _ in range(10):
        picker.claim("slow")
    assert picker.claim("fast", sources=2) is None  # ten missing: every source would fetch copies


def test_released_claims_go_back_and_checked_pieces_are_counted_once() -> None:
    picker = PiecePicker(4 * MIB, MIB)
    picker.swarming = True
    first = picker.claim("a")
    picker.release("a")
    assert picker.claims == {}
    index = first[0] // MIB
    picker.claims.setdefault(index, set()).add("b")
    picker.received("b", index)
    assert picker.claim("c", has=lambda i: i == index) is None  # being verified: not asked again
    assert picker.checked(index, good=False) is False and not picker.have[index]
    assert picker.claim("c", has=lambda i: i == index) == (index * MIB, MIB)  # failed: asked again
    picker.received("c", index)
    picker.received("d", index)  # an endgame copy
    assert picker.checked(index, good=True) is True
    assert picker.checked(index, good=True) is False  # the second copy adds nothing
    assert picker.status() == {"pieces": 4, "have": 1, "claimed": 0, "checking": 0}


@pytest.mark.parametrize("have, partial, missing, expect_has, expect_rank, one_at_a_time", [
    # a complete holder, alone: everything, no preference
    (None, [], 10, [1, 1, 1, 1], [0, 0, 0, 0], False),
    # a partial holder with pieces 0 and 2, beside another partial source with piece 2:
    # only its pieces, the rarer (0) first
    ([1, 0, 1, 0], [([0, 0, 1, 0], "p")], 10, [1, 0, 1, 0], [0, 0, 1, 0], False),
    # a complete holder beside a partial source holding 0 and 1: only the pieces nobody else has,
    # our stripe (even pieces: "a" sorts before "p") first, one at a time
    (None, [([1, 1, 0, 0], "p")], 10, [0, 0, 1, 1], [0, 1, 0, 1], True),
    # the same in the endgame: everything
    (None, [([1, 1, 0, 0], "p")], ENDGAME_COPIES, [1, 1, 1, 1], [0, 1, 0, 1], True),
])
def test_choice_for_a_source(have: list[int], partial: list, missing: int, expect_has: list[int],
                             expect_rank: list[int], one_at_a_time: bool) -> None:
    choice = choice_for("a" * 32, have, partial, missing)
    assert [int(bool(choice.has(i))) for i in range(4)] == expect_has
    assert [choice.rank(i) for i in range(4)] == expect_rank
    assert choice.one_at_a_time == one_at_a_time


def test_pickers_share_one_generator_seeded_once() -> None:
    """A picker without a generator of its own uses the module's: seeding one from the OS for every
    download cost a 16 KiB fetch 60 us (2.4 % of the requester's time fetching small files)."""
    first, second = PiecePicker(4 * MIB, MIB), PiecePicker(8 * MIB, MIB)
    assert first.rng is second.rng
    assert PiecePicker(4 * MIB, MIB, rng=random.Random(3)).rng is not first.rng
