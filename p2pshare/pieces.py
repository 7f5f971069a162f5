"""Which piece to ask which source for: the piece policy of a download, pure.

Nothing here touches a socket, a file or a clock: a ``PiecePicker`` is the
bookkeeping of one download's pieces (verified, claimed by a source, received
and waiting for verification), and ``choice_for`` turns what a source and the
download's other sources hold into the filter and ranking ``claim`` applies.
Both are table-tested in tests/test_pieces.py; the transfer protocol only
asks ``claim`` for the next range and reports what came of it.

The policy:

* with one holder, in order (runs of consecutive pieces, so that a ``get``
  covers several), except the first ``RANDOM_START`` pieces, picked at random
  so that peers starting together hold different pieces;
* once the download is *swarming* (other peers hold or fetch the content), one
  piece at a time, at random among those of the best rank: from a partial
  holder the rarest among our partial sources; from a complete holder beside
  partial ones only the pieces no partial source has (until the endgame), its
  own stripe first (piece index modulo the number of peers, in peer id order),
  and one range at a time on that connection;
* endgame: when every missing piece is claimed and at most
  ``max(ENDGAME_COPIES, sources)`` are missing, a piece already being fetched
  may be claimed by one more source, so a slow holder does not hold up the end.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, Hashable, Optional, Sequence

from attrs import frozen

RANDOM_START = 2  # first pieces picked at random even with one holder
ENDGAME_COPIES = 2  # sources that may fetch one piece at once, at the end
ENDGAME_MAX_PIECE = 4 * 1024 * 1024  # larger pieces get no second copy (a copy waits in memory)
_RNG = random.Random()  # the pickers' random first pieces
RUN = 8 * 1024 * 1024  # bytes of consecutive pieces one claim covers with a single holder
NO_MANIFEST_RUN = 16 * 1024 * 1024  # the same, for a file offered without a manifest
WINDOW_BYTES = 16 * 1024 * 1024  # bytes asked for and not yet received, per source
MAX_WINDOW = 512 * 1024 * 1024  # the most a window grows to (64 gets of 8 MiB: what a holder accepts)


def window_bytes(bandwidth: float, rtt: float, floor: int = WINDOW_BYTES, cap: int = MAX_WINDOW) -> int:
    """The bytes a source must have in flight to keep a link of *bandwidth* bytes/s busy over a
    round trip of *rtt* seconds (bandwidth x delay, doubled so that the rate can still grow), never
    under *floor* nor over *cap*."""
    return max(floor, min(cap, int(2 * bandwidth * rtt)))


@frozen
class Choice:
    """What one source may be asked for: ``has(i)``, ``rank(i)`` (lower first), and whether only one
    range at a time may be in flight on it."""

    has: Callable[[int], bool]
    rank: Callable[[int], int]
    one_at_a_time: bool = False


def _everything(i: int) -> bool:
    return True


def _same(i: int) -> int:
    return 0


def choice_for(me: str, have: Optional[Sequence[int]], partial: Sequence[tuple[Sequence[int], str]],
               missing: int, endgame_zone: int = ENDGAME_COPIES) -> Choice:
    """The policy for a source holding *have* (None: the whole file), given the download's partial
    sources as (have, peer id) pairs, our own peer id *me* and the pieces still *missing*."""
    haves = [h for h, _ in partial]
    if have is not None:  # a partial holder: the pieces fewest of our partial sources have first
        return Choice(have.__getitem__, lambda i: sum(h[i] for h in haves))
    if not partial:
        return Choice(_everything, _same)
    # A complete holder beside partial ones.  Peers fetching together split the rare pieces by
    # stripes (piece index modulo their number, in order of peer id), so the holder sends each
    # about once; and only rare ones until the end: what a partial source has, the others can trade.
    ids = sorted({me} | {peer for _, peer in partial})
    stripes, mine = len(ids), ids.index(me)

    def rare(i: int) -> bool:
        return not any(h[i] for h in haves)

    return Choice(rare if missing > endgame_zone else _everything,
                  lambda i: 0 if i % stripes == mine else 1, one_at_a_time=True)


class PiecePicker:
    """The pieces of one download: verified (``have``), claimed by sources, or received and waiting
    for verification; ``claim`` hands out the next range for a source."""

    def __init__(self, size: int, piece_size: int, have: Optional[bytearray] = None, manifest: bool = True,
                 rng: Optional[random.Random] = None, run: int = RUN) -> None:
        self.size, self.piece_size, self.manifest = size, piece_size, manifest
        self.count = -(-size // piece_size) if size else 0
        self.have = have if have is not None else bytearray(self.count)
        self.claims: dict[int, set[Hashable]] = {}
        self.checking: Counter[int] = Counter()  # received, waiting for verification: copies of each
        self.rng = rng or _RNG  # (seeding a generator per download from the OS: 60 us of a small file's fetch)
        self.swarming = False
        self.run = run if manifest else NO_MANIFEST_RUN
        self.claimed = 0  # claims handed out so far
        self._low = 0  # no missing piece before this one

    def length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)

    @property
    def missing(self) -> int:
        return self.have.count(0)

    @property
    def complete(self) -> bool:
        return all(self.have)

    @property
    def first_missing(self) -> int:
        while self._low < self.count and self.have[self._low]:
            self._low += 1
        return self._low

    def _free(self, index: int, has: Callable[[int], bool]) -> bool:
        return not self.have[index] and index not in self.checking and not self.claims.get(index) and has(index)

    def claim(self, source: Hashable, has: Callable[[int], bool] = _everything,
              rank: Callable[[int], int] = _same, sources: int = 1) -> Optional[tuple[int, int]]:
        """The next range for *source*, as (offset, length), among the pieces it *has*; None when
        there is nothing for it.  *sources* is how many sources the download has (endgame)."""
        free: list[int] = []
        spare = None
        in_order = not self.swarming and self.claimed >= RANDOM_START
        for index in range(self.first_missing, self.count):
            if self.have[index] or index in self.checking or not has(index):
                continue
            claimants = self.claims.get(index)
            if not claimants:
                free.append(index)
                if in_order:
                    break
            elif spare is None and source not in claimants and len(claimants) < ENDGAME_COPIES:
                spare = index
        if free:
            ranks = [rank(i) for i in free]
            best = min(ranks)
            first = self.rng.choice([i for i, r in zip(free, ranks) if r == best])
            last = first
            if in_order:  # one holder: a run of consecutive pieces in one range
                while (last + 1 < self.count and (last + 2 - first) * self.piece_size <= self.run
                       and self._free(last + 1, has)):
                    last += 1
        elif (spare is not None and self.piece_size <= ENDGAME_MAX_PIECE
              and self.missing <= max(ENDGAME_COPIES, sources)):
            first = last = spare  # endgame: only the last few pieces, or every source would fetch copies
        else:
            return None
        for index in range(first, last + 1):
            self.claims.setdefault(index, set()).add(source)
        self.claimed += 1
        end = min(self.size, (last + 1) * self.piece_size)
        return first * self.piece_size, end - first * self.piece_size

    def release(self, source: Hashable) -> None:
        """*source* is gone: what it had claimed goes back to the pool."""
        for index in [i for i, c in self.claims.items() if source in c]:
            self.unclaim(source, index)

    def unclaim(self, source: Hashable, index: int) -> None:
        claimants = self.claims.get(index)
        if claimants is not None:
            claimants.discard(source)
            if not claimants:
                del self.claims[index]

    def received(self, source: Hashable, index: int) -> None:
        """*source* delivered the last byte of piece *index*: not asked again while it is checked."""
        self.unclaim(source, index)
        self.checking[index] += 1

    def checked(self, index: int, good: bool) -> bool:
        """A received copy of *index* was verified (*good*) or not; True when it is newly ours."""
        self.checking[index] -= 1
        if self.checking[index] <= 0:
            del self.checking[index]
        if good and not self.have[index]:
            self.have[index] = 1
            self.claims.pop(index, None)
            return True
        return False

    def status(self) -> dict[str, Any]:
        return {"pieces": self.count, "have": self.count - self.missing, "claimed": len(self.claims),
                "checking": sum(self.checking.values())}
