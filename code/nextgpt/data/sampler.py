"""Which samples form each batch: a deterministic, seedable, resumable, distributed mixture of datasets.

`MixtureSampler` is a batch sampler over the concatenation of a stage's datasets (global index = offset of the
dataset + local index, as torch's ConcatDataset). Every epoch's plan is a pure function of (seed, epoch, dataset
sizes, global batch size), so all ranks compute the same plan without communicating and a resumed run continues
with exactly the batches it would have seen.

Two mixtures (cfg: `mode`):
  round_robin  as the original (its DistributedMultiDatasetBatchSampler): each round yields one global batch
               from every dataset in catalog order; rounds = ceil(largest dataset / global batch); smaller
               datasets wrap around (reshuffled on each pass). Every micro-batch holds ONE dataset (one modality,
               one stage-3 task).
  mixed        one permutation of all samples of all datasets; batches mix datasets and modalities; the tail is
               filled by wrapping around, so every sample is seen at least once per epoch.

Global batch = batch_size (per rank) x world_size; rank r takes the slice [r*batch_size, (r+1)*batch_size).

Length grouping (`group_by_length`, as LLaVA's megabatches): the shuffled order is cut into megabatches of
`megabatch` global batches, each is sorted by length (longest first) and cut back into global batches, so a
micro-batch holds samples of similar length (less padding) while the order stays random at megabatch scale.

Resume: `state_dict()` -> {epoch, position (global batches already consumed in this epoch), ...};
`load_state_dict(state)` makes the next `__iter__` start at that batch. The sampler counts the batches it has
handed out; a DataLoader with worker processes fetches ahead, so a trainer using workers passes its own count:
`state_dict(consumed=steps_done_this_epoch)`.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence, Sized

import numpy as np

MODES = ("round_robin", "mixed")


class MixtureSampler:
    def __init__(self, datasets: Sequence[Sized], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, group_by_length: bool = False, mode: str = "round_robin",
                 lengths: Sequence[Sequence[int]] | None = None, megabatch: int = 8):
        if mode not in MODES:
            raise ValueError(f"sampler mode {mode!r}; allowed: {', '.join(MODES)}")
        if seed < 0:
            raise ValueError(f"sampler seed must be >= 0, got {seed}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch layout: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.sizes = [len(d) for d in datasets]
        if not self.sizes or min(self.sizes) == 0:
            raise ValueError(f"every dataset needs at least one sample (sizes {self.sizes})")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.mode, self.group_by_length, self.megabatch = mode, group_by_length, max(1, megabatch)
        self.lengths: list[np.ndarray] | None = None
        if group_by_length:
            if lengths is None:
                lengths = [getattr(d, "lengths", None) for d in datasets]
                if any(x is None for x in lengths):
                    raise ValueError("group_by_length needs per-sample lengths (a `lengths` attribute on each "
                                     "dataset, or the `lengths` argument)")
            self.lengths = [np.asarray(x, dtype=np.int64) for x in lengths]
            if [len(x) for x in self.lengths] != self.sizes:
                raise ValueError(f"lengths {[len(x) for x in self.lengths]} do not match dataset sizes {self.sizes}")
        self.epoch = 0
        self.position = 0                   # global batches of `epoch` already handed out / consumed
        self._plan_cache: tuple[int, np.ndarray] | None = None
        self._iterating_epoch: int | None = None     # the epoch whose plan the last __iter__ walked

    # ------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch (each rank gets this many micro-batches)."""
        if self.mode == "round_robin":
            return math.ceil(max(self.sizes) / self.global_batch) * len(self.sizes)
        return math.ceil(sum(self.sizes) / self.global_batch)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def _stream(self, dataset: int, count: int) -> np.ndarray:
        """`count` local indices of one dataset: successive fresh permutations of it (wrap-around)."""
        n = self.sizes[dataset]
        passes = [self._rng(dataset, p).permutation(n) for p in range(math.ceil(count / n))]
        return np.concatenate(passes)[:count]

    def _group(self, order: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Sort each megabatch of `order` by length, longest first (stable, so ties keep the shuffled order)."""
        size = self.global_batch * self.megabatch
        out = order.copy()
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            out[start:start + size] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        return out

    def plan(self, epoch: int | None = None) -> np.ndarray:
        """(batches, global_batch) global indices of one epoch, identical on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        saved, self.epoch = self.epoch, epoch
        try:
            g = self.global_batch
            if self.mode == "round_robin":
                rounds = math.ceil(max(self.sizes) / g)
                per_dataset = []
                for d in range(len(self.sizes)):
                    local = self._stream(d, rounds * g)
                    if self.lengths is not None:
                        local = self._group(local, self.lengths[d])
                    per_dataset.append((local + self.offsets[d]).reshape(rounds, g))
                plan = np.stack(per_dataset, axis=1).reshape(rounds * len(self.sizes), g)   # round-major
            else:
                total = sum(self.sizes)
                order = self._rng(len(self.sizes)).permutation(total)   # a key no dataset uses
                order = np.concatenate([order, order[: (-total) % g]])       # wrap the tail to a full batch
                if self.lengths is not None:
                    order = self._group(order, np.concatenate(self.lengths))
                plan = order.reshape(-1, g)
        finally:
            self.epoch = saved
        self._plan_cache = (epoch, plan)
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        self._iterating_epoch = self.epoch
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while self.position < len(plan):
            batch = plan[self.position, lo:hi].tolist()
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._iterating_epoch = epoch, 0, None

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict:
        """consumed: global batches of the epoch being iterated that the trainer has finished, counted from the
        epoch's start (including any batches skipped by a resume); default: what this sampler handed out."""
        epoch, position = self.epoch, self.position
        if consumed is not None:
            epoch = self.epoch if self._iterating_epoch is None else self._iterating_epoch
            position = consumed
            if position >= len(self):
                epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed, "sizes": list(self.sizes),
                "global_batch": self.global_batch, "mode": self.mode, "group_by_length": self.group_by_length}

    def load_state_dict(self, state: dict) -> None:
        # Resuming with another seed, mixture or data would silently train on a different order: refuse.
        mine = self.state_dict()
        for key in ("seed", "sizes", "global_batch", "mode", "group_by_length"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"cannot resume the sampler: saved {key}={state[key]!r}, now {mine[key]!r}")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"cannot resume the sampler: position {state['position']} outside 0..{len(self)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterating_epoch = None
