"""Depth/camera_info pairing and frame matching by stamp (the core, no ROS: stamps in ns, opaque messages)."""
from __future__ import annotations

from trident_ros.ros.depth_pairing import DepthPairing

S = 1_000_000_000  # one second in ns
SLOP = 100_000_000  # 0.1 s
KEEP = 4


def feed(pairing: DepthPairing, *stamps: int, info_offset: int = 0) -> None:
    """A depth ``('d', stamp)`` and then a camera_info ``('i', stamp + info_offset)`` for each stamp."""
    for stamp in stamps:
        pairing.add_depth(stamp, ('d', stamp))
        pairing.add_info(stamp + info_offset, ('i', stamp + info_offset))


def test_exact_pairs_only_equal_stamps_and_frames_match_only_equal_stamps():
    pairing = DepthPairing(0, KEEP)
    feed(pairing, 10 * S)
    assert pairing.match(10 * S) == (('d', 10 * S), ('i', 10 * S))
    assert pairing.match(10 * S + 1) is None
    feed(pairing, 11 * S, info_offset=1)  # info 1 ns later: no pair
    assert pairing.match(11 * S) is None


def test_within_the_slop_the_nearest_pairs_and_the_nearest_pair_matches():
    pairing = DepthPairing(SLOP, KEEP)
    pairing.add_info(10 * S - 50_000_000, 'far info')
    pairing.add_info(10 * S + 20_000_000, 'near info')  # info first, then its depth
    pairing.add_depth(10 * S, 'depth 10')
    assert pairing.match(10 * S + 90_000_000) == ('depth 10', 'near info')
    feed(pairing, 11 * S, info_offset=-30_000_000)  # depth first, then its info
    assert pairing.match(11 * S - SLOP) == (('d', 11 * S), ('i', 11 * S - 30_000_000))
    assert pairing.match(int(10.5 * S)) is None


def test_outside_the_slop_nothing_pairs():
    pairing = DepthPairing(SLOP, KEEP)
    feed(pairing, 10 * S, 11 * S, info_offset=SLOP + 1)
    assert pairing.match(10 * S) is None and pairing.match(11 * S) is None


def test_stamps_that_go_backwards_restart_the_pairing():
    """A bag played again: the old loop's pairs and waiting messages are dropped, the new loop pairs at once."""
    pairing = DepthPairing(SLOP, KEEP)
    feed(pairing, 100 * S, 101 * S, 102 * S)
    pairing.add_info(102 * S + 50_000_000, 'old loop info, waiting')
    for stamp in (60 * S, 61 * S, 62 * S):
        feed(pairing, stamp)
        assert pairing.match(stamp) == (('d', stamp), ('i', stamp))
        assert pairing.match(102 * S) is None
    pairing.add_depth(102 * S, 'depth')  # would pair with the old loop's waiting info without the restart
    assert pairing.match(102 * S) is None


def test_a_late_message_of_the_old_loop_does_not_stop_the_new_one():
    pairing = DepthPairing(SLOP, KEEP)
    feed(pairing, 100 * S, 101 * S, 102 * S)
    pairing.add_depth(60 * S, ('d', 60 * S))  # restarts
    pairing.add_info(102 * S, 'late info of the old loop')
    pairing.add_info(60 * S, ('i', 60 * S))  # restarts again: drops that one, keeps the waiting depth
    assert pairing.match(60 * S) == (('d', 60 * S), ('i', 60 * S))


def test_backwards_across_topics_is_no_restart():
    """Depth running ahead of its camera_info pairs as usual, also across a restart."""
    pairing = DepthPairing(0, KEEP)
    for stamps in ((10 * S, 11 * S, 12 * S), (1 * S, 2 * S)):  # then a reset to an earlier time
        for stamp in stamps:
            pairing.add_depth(stamp, ('d', stamp))
        for stamp in stamps:
            pairing.add_info(stamp, ('i', stamp))
        assert all(pairing.match(stamp) == (('d', stamp), ('i', stamp)) for stamp in stamps)


def test_buffers_are_bounded():
    pairing = DepthPairing(0, KEEP)
    for stamp in range(KEEP + 2):  # depths without info: the oldest two are no longer waiting
        pairing.add_depth(stamp * S, ('d', stamp * S))
    for stamp in range(KEEP + 2):
        pairing.add_info(stamp * S, ('i', stamp * S))
    assert [pairing.match(stamp * S) is not None for stamp in range(KEEP + 2)] == [False, False] + [True] * KEEP
    feed(pairing, *(stamp * S for stamp in range(10, 10 + KEEP + 1)))  # one pair more than kept
    assert pairing.match(10 * S) is None and pairing.match((10 + KEEP) * S) is not None


def test_the_pinned_frame_keeps_its_pair_and_takes_a_nearer_late_one():
    pairing = DepthPairing(SLOP, KEEP)
    feed(pairing, 10 * S)
    pairing.pin(10 * S + 50_000_000)
    feed(pairing, *(stamp * S for stamp in range(11, 11 + KEEP + 1)))  # pushes the 10 s pair out of the kept
    assert pairing.match(10 * S) is None
    assert pairing.match(10 * S + 50_000_000) == (('d', 10 * S), ('i', 10 * S))
    feed(pairing, 10 * S + 40_000_000)  # a nearer one arrives late (and restarts: the pin stays)
    assert pairing.match(10 * S + 50_000_000)[0] == ('d', 10 * S + 40_000_000)
    pairing.pin(30 * S)  # a frame whose depth comes after it
    assert pairing.match(30 * S) is None
    feed(pairing, 30 * S + 10_000_000)
    assert pairing.match(30 * S) == (('d', 30 * S + 10_000_000), ('i', 30 * S + 10_000_000))
    pairing.clear()
    assert pairing.match(30 * S) is None
