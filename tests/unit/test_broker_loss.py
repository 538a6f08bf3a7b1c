"""The one place that says when to look for records the broker lost, and which are missing."""

from __future__ import annotations

from khala_stream.broker.loss import LOSS_CHECK_S, LossCheck, short_partitions


def test_a_loss_check_is_due_once_per_interval() -> None:
    check = LossCheck(every_s=3600.0)
    assert check.due()
    assert not check.due()
    eager = LossCheck(every_s=0.0)
    assert eager.due() and eager.due()
    assert LOSS_CHECK_S > 0


def test_short_partitions_are_those_whose_log_ends_before_the_acknowledged_end() -> None:
    acknowledged = {0: 10, 1: 5, 2: 7}
    assert short_partitions({0: 10, 1: 6, 2: 7}, acknowledged) == {}
    assert short_partitions({0: 4, 1: 5}, acknowledged) == {0: (4, 10), 2: (0, 7)}
