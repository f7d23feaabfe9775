"""Depth images paired with their camera_info by stamp, and colour frames matched to those pairs; no ROS.

Stamps are integers in nanoseconds, messages are opaque. A depth image and a camera_info pair when
their stamps are equal, or the nearest within the slop; a message without a partner yet waits in a
small buffer of its topic. The newest pairs are kept; a colour frame takes the kept pair whose
depth stamp is nearest its own, within the same slop. The frame being processed is pinned
(:meth:`DepthPairing.pin`): its match, even one completed later, is not pushed out by newer pairs.

A stamp older than the last one of its topic (a bag played in a loop, a simulator reset) restarts
the pairing: the waiting messages and kept pairs stamped after it are dropped (in a loop or a
reset: all of them), so the new timeline pairs at once and never with the old one. The pinned
frame keeps its match.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from typing import Any

Pair = tuple[Any, Any]
"""(depth, camera_info) messages."""
Stamped = tuple[int, Any]
"""(stamp in ns, a message or a :data:`Pair`); a pair's stamp is its depth's."""
DEPTH, INFO = 0, 1


def nearest(stamp: int, items: Iterable[Stamped], slop_ns: int) -> Stamped | None:
    """The item whose stamp is nearest ``stamp`` (ns; the older one on a tie), if at most ``slop_ns`` away."""
    best = min(items, key=lambda item: abs(item[0] - stamp), default=None)
    return best if best is not None and abs(best[0] - stamp) <= slop_ns else None


class DepthPairing:
    """The depth/camera_info pairs of one depth stream; safe to call from several threads.

    Args:
        slop_ns: the largest stamp difference (ns) within a pair and between a frame and its pair;
            0: equal stamps only.
        keep: pairs kept for matching, and messages per topic waiting for their partner.
    """

    def __init__(self, slop_ns: int, keep: int) -> None:
        self._slop = max(int(slop_ns), 0)
        self._lock = threading.Lock()
        self._waiting = (collections.deque(maxlen=keep), collections.deque(maxlen=keep))  # DEPTH, INFO
        self._last: list[int | None] = [None, None]  # the last stamp of each topic
        self._pairs: collections.deque[Stamped] = collections.deque(maxlen=keep)
        self._pinned_stamp: int | None = None  # stamp of the frame being processed
        self._pinned: Stamped | None = None  # its best pair so far

    def add_depth(self, stamp: int, depth: Any) -> None:
        """A depth image stamped ``stamp`` (ns) arrived."""
        self._add(DEPTH, stamp, depth)

    def add_info(self, stamp: int, info: Any) -> None:
        """A camera_info stamped ``stamp`` (ns) arrived."""
        self._add(INFO, stamp, info)

    def pin(self, stamp: int) -> None:
        """Hold on to the pair of the frame stamped ``stamp`` (ns), now kept or completed later."""
        with self._lock:
            self._pinned_stamp = stamp
            self._pinned = nearest(stamp, self._pairs, self._slop)

    def match(self, stamp: int) -> Pair | None:
        """The pair for the frame stamped ``stamp`` (ns): the pinned one for the pinned frame, else the nearest kept."""
        with self._lock:
            if stamp == self._pinned_stamp and self._pinned is not None:
                return self._pinned[1]
            found = nearest(stamp, self._pairs, self._slop)
            return found[1] if found is not None else None

    def clear(self) -> None:
        """Drop everything, the pin included."""
        with self._lock:
            for queue in (*self._waiting, self._pairs):
                queue.clear()
            self._last = [None, None]
            self._pinned_stamp, self._pinned = None, None

    def _add(self, side: int, stamp: int, msg: Any) -> None:
        with self._lock:
            last = self._last[side]
            if last is not None and stamp < last:
                self._restart(stamp)
            self._last[side] = stamp
            others = self._waiting[1 - side]
            partner = nearest(stamp, others, self._slop)
            if partner is None:
                self._waiting[side].append((stamp, msg))
                return
            del others[next(i for i, item in enumerate(others) if item is partner)]  # by identity: no msg ==
            pair = (stamp, (msg, partner[1])) if side == DEPTH else (partner[0], (partner[1], msg))
            self._pairs.append(pair)
            if self._pinned_stamp is not None:
                candidates = [pair] if self._pinned is None else [self._pinned, pair]
                self._pinned = nearest(self._pinned_stamp, candidates, self._slop)

    def _restart(self, stamp: int) -> None:
        """Drop the waiting messages and kept pairs stamped after ``stamp`` (under the lock); the pin stays.

        The other topic's last stamp is lowered to ``stamp`` too, so that its own first message of the
        new timeline (e.g. the camera_info of the depth that restarted) is no second restart.
        """
        for queue in (*self._waiting, self._pairs):
            kept = [item for item in queue if item[0] <= stamp]
            queue.clear()
            queue.extend(kept)
        self._last = [None if last is None else min(last, stamp) for last in self._last]
