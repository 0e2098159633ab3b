"""The garbage collector kept out of the loop's way (lggunet.host_gc), and its pauses counted."""

import gc
import weakref

from lggunet import host_gc


class Node:
    """A cyclic object: only the cyclic collector reclaims it."""

    def __init__(self):
        self.me = self


def test_full_collections_counts_generation_2_passes_only_and_not_chosen_ones():
    with host_gc.FullCollections() as pauses:
        gc.collect(0)
        gc.collect(1)
        assert pauses.take() == (0, 0.0)
        gc.collect(2)
        gc.collect()
        count, ms = pauses.take()
        assert count == 2 and ms > 0
        assert pauses.take() == (0, 0.0)  # take() starts the count again
        pauses.paused = True
        gc.collect()
        pauses.paused = False
        assert pauses.take() == (0, 0.0)
    gc.collect()  # after exit: no longer listening
    assert pauses.take() == (0, 0.0)
    assert pauses._callback not in gc.callbacks


def test_steady_host_freezes_survivors_and_gives_them_back_on_exit():
    """A cycle that dies while frozen is kept from the collector (a full pass does not walk
    it) until exit, when it is reclaimed; `again()` freezes what was made since."""
    assert gc.get_freeze_count() == 0
    node = Node()
    ref = weakref.ref(node)
    with host_gc.SteadyHost() as steady:
        assert steady.frozen >= 1
        del node
        gc.collect()
        assert ref() is not None  # frozen: not walked
        later = Node()
        later_ref = weakref.ref(later)
        ms = steady.again()
        assert ms >= 0 and steady.frozen >= 1
        del later
        gc.collect()
        assert later_ref() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None and later_ref() is None


def test_steady_host_leaves_a_freeze_of_the_process_alone():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with host_gc.SteadyHost():
            pass
        assert gc.get_freeze_count() >= before > 0
    finally:
        gc.unfreeze()


def test_loop_collector_reports_passes_by_epoch_and_not_its_own():
    with host_gc.LoopCollector() as loop:
        assert gc.get_freeze_count() > 0
        gc.collect()
        first = loop.epoch_end()
        assert first["gc_full_collections"] == 1 and first["gc_full_ms"] > 0
        assert first["gc_epoch_end_ms"] >= 0
        second = loop.epoch_end()  # the chosen pass of the first call is not counted
        assert (second["gc_full_collections"], second["gc_full_ms"]) == (0, 0.0)
    assert gc.get_freeze_count() == 0 and loop.pauses._callback not in gc.callbacks
