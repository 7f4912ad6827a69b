"""Loader worker processes with an exact position. Worker w of W serves micro-batches
w, w+W, w+2W, ... (torch DataLoader's round-robin) from its own share of the rank's data,
and sends its loader's state along with every batch; the state of the last batch handed
to the trainer from each worker is therefore exactly where each worker must resume."""
from __future__ import annotations

import signal
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmforge.config import ConfigError


def _ignore_stop_signals(_: int) -> None:
    # Slurm and Ctrl-C signal the whole process group; the trainer decides when to stop
    # and shuts its workers down itself.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class _WorkerShare(IterableDataset):
    def __init__(self, loader: Any, n_workers: int, states: list | None, served: int) -> None:
        self.loader, self.n_workers, self.states, self.served = loader, n_workers, states, served

    def __iter__(self) -> Iterator[tuple[int, dict, dict]]:
        # DataLoader asks worker 0 first; after a resume the next batch is due from the
        # worker that comes after the last one served, so identities are rotated.
        w = (get_worker_info().id + self.served) % self.n_workers
        mine = self.loader.for_worker(w, self.n_workers)
        if self.states is not None and self.states[w] is not None:  # else: none served yet
            mine.load_state_dict(self.states[w])
        for batch in mine:
            yield w, batch, mine.state_dict()


class WorkerLoader:
    """`loader` (BlockLoader or ShardLoader) read by `num_workers` processes; 0 = in this
    process. state_dict() is exact either way; shards need no per-worker state (their
    position is one global sample count), so their resume also works with another W.
    `pin_memory` (for a CUDA device): batches come in page-locked memory, so the trainer's
    non_blocking copy to the GPU is asynchronous (from pageable memory the host waits for
    it); with workers, DataLoader's thread pins the next batches while the step runs."""

    def __init__(self, loader: Any, num_workers: int, prefetch: int = 4,
                 pin_memory: bool = False) -> None:
        self.loader, self.num_workers, self.prefetch = loader, num_workers, prefetch
        self.pin_memory = pin_memory
        self.states: list | None = None
        self.served = 0
        self._it: Iterator | None = None
        self.layout_free = getattr(loader, "layout_free", False)

    def __iter__(self) -> "WorkerLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.num_workers == 0:
            batch = next(self.loader)
            return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
        if self._it is None:
            share = _WorkerShare(self.loader, self.num_workers, self.states, self.served)
            self._it = iter(DataLoader(share, batch_size=None, num_workers=self.num_workers,
                                       prefetch_factor=self.prefetch,
                                       pin_memory=self.pin_memory,
                                       worker_init_fn=_ignore_stop_signals))
            self.states = self.states or [None] * self.num_workers
        w, batch, state = next(self._it)
        self.states[w] = state
        self.served += 1
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        """Unusable documents this rank's readers saw so far, by reason: the sum over readers
        that read their own files, the most of any where every reader sees every document."""
        if self.num_workers == 0 or not self.states:
            return dict(getattr(self.loader, "skipped", {}))
        out: dict[str, int] = {}
        for st in filter(None, self.states):
            combine = (lambda a, b: a + b) if st.get("scheme") == "files" else max
            for k, v in st.get("skipped", {}).items():
                out[k] = combine(out.get(k, 0), v)
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers == 0:
            return self.loader.state_dict()
        if self.layout_free:
            return self.loader.state_after(self.served)
        return {"kind": "workers", "num_workers": self.num_workers, "served": self.served,
                "states": self.states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._it = None
        if state.get("kind") == "workers":
            if state["num_workers"] != self.num_workers:
                raise ConfigError(f"the checkpoint's data position was saved with "
                                  f"data.num_workers={state['num_workers']}; on-the-fly data "
                                  "resumes only with the same value (data=shards: with any)")
            if hasattr(self.loader, "check_state"):  # here: a worker's error reads as a traceback
                for w, st in enumerate(state["states"]):
                    if st is not None:
                        self.loader.for_worker(w, self.num_workers).check_state(st)
            self.states, self.served = state["states"], state["served"]
            return
        if self.num_workers and not self.layout_free:
            raise ConfigError("the checkpoint's data position was saved with "
                              "data.num_workers=0; on-the-fly data resumes only with the same "
                              "value (data=shards: with any)")
        self.loader.load_state_dict(state)
        self.states, self.served = None, 0

    def close(self) -> None:
        self._it = None  # DataLoader shuts its workers down when its iterator goes
