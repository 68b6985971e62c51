"""Encoded preference pairs: VAE latents + text embeddings, live or cached on disk once as safetensors.

Why cache: the VAE encoder and text encoders are frozen, so encoding each pair every epoch (and for every
beta of a sweep) is wasted work; the cache is keyed by data fingerprint + base model + resolution, so
runs at different betas share it. Shards are read by row through `safe_open` slices (memory-mapped), so
random access does not load whole shards.

Both sources return the same batch dict:
  latents_w, latents_l [B,C,h,w]; prompt_embeds [B,T,D]; SDXL also pooled_prompt_embeds [B,D2] and
  time_ids_w, time_ids_l [B,6] (original size, crop top-left, target size).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deradiff.data.pickapic import decode_image
from deradiff.errors import DeradiffError
from deradiff.fileio import match_umask
from deradiff.models.family import is_sdxl

INDEX = "index.json"


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]: ...


def preprocess(image, resolution: int) -> tuple[torch.Tensor, list[int]]:
    """Resize the short side to `resolution`, center-crop; pixels in [-1,1] and SDXL time ids."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    return pixels, [h, w, top, left, resolution, resolution]


class Encoder:
    """Encodes caption/image-bytes rows with a pipeline's frozen VAE and text encoder(s)."""

    def __init__(self, pipe: Any, resolution: int, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
        self.pipe, self.resolution, self.device, self.dtype = pipe, resolution, torch.device(device), dtype
        self.sdxl = is_sdxl(pipe)
        self.seed = seed

    @torch.no_grad()
    def encode_images(self, images: list, row_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, ids = zip(*(preprocess(img, self.resolution) for img in images))
        vae = self.pipe.vae
        x = torch.stack(pixels).to(self.device, vae.dtype)
        dist = vae.encode(x).latent_dist
        # a per-row generator: the latent sample of a row does not depend on batching or caching
        eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(self.seed + int(r)))
                           for r in row_ids]).to(dist.mean.device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
        return latents.float().cpu(), torch.tensor(ids, dtype=torch.float32)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return {"prompt_embeds": embeds.float().cpu()}

    def encode_rows(self, rows: dict[str, list], row_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        wins = [decode_image(b) for b in rows["jpg_w"]]
        loses = [decode_image(b) for b in rows["jpg_l"]]
        lat_w, ids_w = self.encode_images(wins, row_ids)
        lat_l, ids_l = self.encode_images(loses, [r + (1 << 40) for r in row_ids])
        out = {"latents_w": lat_w, "latents_l": lat_l, **self.encode_text(list(rows["caption"]))}
        if self.sdxl:
            out.update(time_ids_w=ids_w, time_ids_l=ids_l)
        return out


class LivePairs:
    """Encodes the requested rows on every access (no cache: the plain, slower path)."""

    def __init__(self, dataset: Any, encoder: Encoder):
        self.dataset, self.encoder = dataset, encoder

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        idx = [int(i) for i in indices]
        rows = self.dataset[idx]
        return {k: v.to(device) for k, v in self.encoder.encode_rows(rows, idx).items()}


class CachedPairs:
    """Reads a cache folder written by `build_cache`; a damaged one raises DeradiffError naming the file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = _read_index(self.folder / INDEX)
        self.shard_rows = int(self.index["shard_rows"])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.index["rows"])

    def _shard(self, i: int):
        if i not in self._handles:
            path = self.folder / self.index["shards"][i]
            try:
                self._handles[i] = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as exc:
                raise DeradiffError(f"latent cache shard '{path}' is damaged or missing ({exc})") from None
        return self._handles[i]

    def check(self, rows: int) -> None:
        """Raise DeradiffError naming the file if the cache is not a complete one of `rows` rows: every shard
        opens (safetensors checks its header against the file size, so a truncated shard fails here) and the
        shards hold exactly the rows the index promises. Reads headers only."""
        if len(self) != rows:
            raise DeradiffError(f"latent cache index '{self.folder / INDEX}' lists {len(self)} rows, the data has {rows}")
        held, last = 0, len(self.index["shards"]) - 1
        for i in range(last + 1):
            shard = self._shard(i)
            counts = {shard.get_slice(key).get_shape()[0] for key in shard.keys()}
            # `get` finds row r in shard r // shard_rows: every shard but the last must be full
            if len(counts) != 1 or (i < last and counts != {self.shard_rows}):
                raise DeradiffError(f"latent cache shard '{self.folder / self.index['shards'][i]}' is damaged "
                                    f"(row counts {sorted(counts)}, expected {self.shard_rows} per full shard)")
            held += counts.pop()
        if held != rows:
            raise DeradiffError(f"latent cache shards in '{self.folder}' hold {held} rows, its index lists {rows}")

    def get(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {}
        for idx in (int(i) for i in indices):
            handle = self._shard(idx // self.shard_rows)
            j = idx % self.shard_rows
            for key in handle.keys():
                rows.setdefault(key, []).append(handle.get_slice(key)[j : j + 1])
        return {k: torch.cat(v).to(device) for k, v in rows.items()}


def cache_key(fingerprint: str, base_model: str, resolution: int, extra: str = "") -> str:
    return hashlib.sha256(f"{fingerprint}|{base_model}|{resolution}|{extra}|v1".encode()).hexdigest()[:16]


def build_cache(dataset: Any, encoder: Encoder, folder: str | os.PathLike, batch_size: int = 16,
                shard_rows: int = 4096, progress: bool = True) -> CachedPairs:
    """Encode every row once into `folder` (temp folder + rename: an interrupted build is never used)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        cached = _intact_cache(folder, len(dataset))
        if cached is not None:
            return cached
    from tqdm.auto import tqdm

    shard_rows = -(-shard_rows // batch_size) * batch_size  # whole encode batches per shard
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, pending, n = [], [], len(dataset)
    for start in tqdm(range(0, n, batch_size), desc="caching latents", disable=not progress):
        ids = list(range(start, min(n, start + batch_size)))
        pending.append(encoder.encode_rows(dataset[ids], ids))
        if sum(len(p["latents_w"]) for p in pending) >= shard_rows or ids[-1] == n - 1:
            shards.append(_write_shard(tmp, len(shards), pending))
            pending = []
    (tmp / INDEX).write_text(json.dumps({"rows": n, "shard_rows": shard_rows, "shards": shards}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return CachedPairs(folder)


def _intact_cache(folder: Path, rows: int) -> CachedPairs | None:
    """The cache in `folder` if it is whole; else None after a note. Why rebuild rather than refuse: a cache
    only saves time, and a damaged one (a disk filled mid-copy, an edited index) can be rebuilt from the data."""
    try:
        cached = CachedPairs(folder)
        cached.check(rows)
        return cached
    except DeradiffError as exc:
        print(f"note: {exc}; rebuilding the latent cache", file=sys.stderr, flush=True)
        return None


def _read_index(path: Path) -> dict[str, Any]:
    """index.json, checked for the keys the reader needs."""
    try:
        index = json.loads(path.read_bytes())
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise DeradiffError(f"latent cache index '{path}' is not valid JSON ({exc})") from None
    ok = (isinstance(index, dict) and isinstance(index.get("rows"), int) and isinstance(index.get("shard_rows"), int)
          and index["shard_rows"] > 0 and isinstance(index.get("shards"), list)
          and all(isinstance(name, str) for name in index["shards"]))
    if not ok:
        raise DeradiffError(f"latent cache index '{path}' is damaged (expected rows, shard_rows and shards)")
    return index


def _write_shard(folder: Path, i: int, parts: list[dict[str, torch.Tensor]]) -> str:
    name = f"shard-{i:05d}.safetensors"
    save_file({k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}, str(folder / name))
    match_umask(folder / name)  # a cache next to shared data is read by teammates too
    return name
