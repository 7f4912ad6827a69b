"""The multi-rank helper itself: one gloo group, results in rank order, a failing rank's
traceback, no hang."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from conftest import run_distributed

pytestmark = pytest.mark.multiproc


def _sum_of_ranks(rank: int, world: int, base: int) -> tuple:
    t = torch.tensor([base + rank])
    dist.all_reduce(t)
    return (rank, world, int(t), os.environ["RANK"], os.environ["WORLD_SIZE"],
            os.environ["LOCAL_RANK"], os.environ["DS_ACCELERATOR"], dist.get_backend())


def test_ranks_share_one_gloo_group_and_return_in_rank_order() -> None:
    assert run_distributed(_sum_of_ranks, 2, 10) == [
        (0, 2, 21, "0", "2", "0", "cpu", "gloo"), (1, 2, 21, "1", "2", "1", "cpu", "gloo")]


def _rank_one_fails(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 could not go on")
    dist.barrier()  # rank 0 would wait here for ever


def test_a_failing_rank_fails_the_caller_with_its_traceback() -> None:
    t0 = time.monotonic()
    with pytest.raises(Exception, match="rank 1 could not go on") as e:
        run_distributed(_rank_one_fails, 2)
    # The cause comes first: rank 0's own error (its peer hung up) follows it, if at all.
    assert str(e.value).lstrip().startswith("rank 1 of 2: Traceback"), str(e.value)
    assert "in _rank_one_fails" in str(e.value)
    assert time.monotonic() - t0 < 60


def _sleep(rank: int, world: int) -> None:
    time.sleep(600)


def test_a_hung_world_is_stopped_at_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still running after 3s"):
        run_distributed(_sleep, 2, timeout_s=3)
    assert time.monotonic() - t0 < 30
