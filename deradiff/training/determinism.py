"""Data order and noise as pure functions of (seed, micro-step, rank).

Why not a stateful DataLoader/RNG: a resumed run must draw exactly the batches and noise the
uninterrupted run would have drawn. Deriving them from counters makes that true by construction (and
independent of worker processes), while accelerate's `save_state` still restores the global RNGs.
"""

from __future__ import annotations

import torch


def global_micro_batch(n_items: int, micro_step: int, global_micro_batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the whole (all-rank) micro-batch number `micro_step`: epoch-wise permutations, drop_last.

    The same global stream for any world size given the same global batch, so 1×8 and 2×4 see the same data.
    """
    per_epoch = n_items // global_micro_batch_size
    if per_epoch < 1:
        raise ValueError(f"dataset of {n_items} items is smaller than one global micro-batch ({global_micro_batch_size})")
    epoch, position = divmod(micro_step, per_epoch)
    gen = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
    order = torch.randperm(n_items, generator=gen)
    return order[position * global_micro_batch_size : (position + 1) * global_micro_batch_size]


def rank_micro_batch(
    n_items: int, micro_step: int, micro_batch_size: int, world_size: int, rank: int, seed: int
) -> torch.Tensor:
    """This rank's slice of global micro-batch `micro_step`."""
    batch = global_micro_batch(n_items, micro_step, micro_batch_size * world_size, seed)
    return batch[rank * micro_batch_size : (rank + 1) * micro_batch_size]


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for this (micro-step, rank)'s noise and timesteps; different on every rank."""
    return torch.Generator(device=device).manual_seed(_mix(seed, micro_step, rank + 1))


def _mix(*values: int) -> int:
    """Combine ints into a 63-bit seed (splitmix-style), so nearby counters give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
