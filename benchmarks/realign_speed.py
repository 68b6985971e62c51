"""Realigned sampling cost: time per image and peak memory against plain sampling of the aligned model.

    python benchmarks/realign_speed.py                    # CPU tiny model; plus SD1.5-sized UNet if a GPU exists
    python benchmarks/realign_speed.py --steps 20 --repeats 5 --cpu-batches 1 4
    python benchmarks/realign_speed.py --skip-cpu --cpu-sd15  # SD1.5-sized UNet on CPU (memory at real size)

Variants, all in one run and interleaved per repeat (the machine is shared: compare ratios, not seconds):
  plain      the aligned model (UNet + LoRA, adapter on) alone: the cost realignment is compared against
  stacked    deradiff realigned, both branches in ONE forward per step (branches="stacked")
  two-call   deradiff realigned, two sequential forwards per step (branches="two-call")
             (the default, branches="auto", is `stacked` for calls of <= 2 rows and `two-call` beyond)
  official   the official-code style: two full UNet copies (deepcopy; the LoRA fused into the aligned copy),
             called one after the other, one image at a time (batch 1)
Every variant runs the same loop: DDIM (eta=1) with classifier-free guidance (scale 7.5) on random prompt
embeddings, lambda 0.5; text encoder and VAE are left out (identical for all variants).

Peak memory = the variant's own weights (each distinct parameter/buffer once) + the peak of memory allocated
during sampling above what was allocated before it: torch.cuda.max_memory_allocated on GPU; on CPU a
TorchDispatchMode that tracks live tensor storages (same quantity, allocator caching excluded; RSS is too
noisy for a few MB on a shared machine).

Targets: time realigned/plain <= 1.9 on CPU and <= 1.7 on GPU at batch 1; memory realigned/plain <= 1.10.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

LAM, GUIDANCE = 0.5, 7.5
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Setup:
    """One model to benchmark: a UNet carrying a LoRA, its scheduler and the input shapes."""

    name: str
    unet: nn.Module
    scheduler: object
    latent_shape: tuple[int, ...]  # per image
    text_shape: tuple[int, ...]  # per image (tokens, dim)
    device: torch.device
    dtype: torch.dtype


# --- models --------------------------------------------------------------------------------------------
def add_lora(unet: nn.Module, rank: int, seed: int = 1) -> nn.Module:
    import peft

    torch.manual_seed(seed)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False))
    return unet


def tiny_setup() -> Setup:
    """The embedded tiny model when it has been built, else the random tiny test pipeline."""
    from deradiff.testing import tiny_sd_pipeline

    pipe, name = None, "tiny random (deradiff.testing)"
    try:
        from deradiff.world import TINY_MODEL_DIR

        if Path(TINY_MODEL_DIR, "model_index.json").is_file():
            from diffusers import StableDiffusionPipeline

            pipe, name = StableDiffusionPipeline.from_pretrained(TINY_MODEL_DIR), "embedded tiny (deradiff.world)"
    except ImportError:
        pass
    pipe = pipe or tiny_sd_pipeline()
    unet = add_lora(pipe.unet.eval(), rank=4)
    cfg = unet.config
    tokens = getattr(pipe.tokenizer, "model_max_length", 16)
    return Setup(name, unet, pipe.scheduler, (cfg.in_channels, cfg.sample_size, cfg.sample_size),
                 (tokens, cfg.cross_attention_dim), torch.device("cpu"), torch.float32)


def sd15_setup(device: torch.device, dtype: torch.dtype) -> Setup:
    """A UNet with SD1.5's architecture and random weights (860M parameters), LoRA rank 8 on attention."""
    from diffusers import DDIMScheduler

    from deradiff.testing import sd15_sized_unet

    unet = sd15_sized_unet(0, device)
    unet = add_lora(unet.to(dtype).eval(), rank=8).to(device=device, dtype=dtype)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return Setup("SD1.5-sized UNet (random weights)", unet, scheduler, (4, 64, 64), (77, 768), device, dtype)


# --- variants ------------------------------------------------------------------------------------------
def variants(setup: Setup) -> dict[str, tuple[Predict, list[nn.Module]]]:
    """name -> (predict(x, t, text) for a CFG-stacked batch, the modules whose weights it keeps in memory)."""
    from deradiff.realignment.denoiser import RealignedDenoiser

    unet = setup.unet
    stacked = RealignedDenoiser(unet, LAM, branches="stacked")
    two_call = RealignedDenoiser(unet, LAM, branches="two-call")
    ref_copy, aligned_copy = official_copies(unet)
    return {
        "plain": (lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample, [unet]),
        "stacked": (lambda x, t, e: stacked(x, t, encoder_hidden_states=e).sample, [unet]),
        "two-call": (lambda x, t, e: two_call(x, t, encoder_hidden_states=e).sample, [unet]),
        "official": (official_predict(ref_copy, aligned_copy), [ref_copy, aligned_copy]),
    }


def official_copies(unet: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Two plain UNets: the base (LoRA removed) and the aligned one (LoRA fused into the weights)."""
    ref, aligned = copy.deepcopy(unet), copy.deepcopy(unet)
    ref.unload_lora()
    aligned.fuse_lora(lora_scale=1.0)
    aligned.unload_lora()
    return ref, aligned


def official_predict(ref: nn.Module, aligned: nn.Module) -> Predict:
    """Per image (batch 1 with its CFG pair): the reference UNet, then the aligned UNet, then mix."""

    def predict(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        images = x.shape[0] // 2
        out = torch.empty_like(x)
        for i in range(images):
            rows = [i, images + i]
            e_ref = ref(x[rows], t, encoder_hidden_states=text[rows]).sample
            e_aligned = aligned(x[rows], t, encoder_hidden_states=text[rows]).sample
            out[rows] = (1 - LAM) * e_ref + LAM * e_aligned
        return out

    return predict


# --- the sampling loop -----------------------------------------------------------------------------------
@torch.no_grad()
def sample(setup: Setup, predict: Predict, batch: int, steps: int) -> torch.Tensor:
    """DDIM eta=1 with CFG for `batch` images; per-image generators, as deradiff's sampling uses."""
    scheduler = setup.scheduler
    scheduler.set_timesteps(steps)
    gens = [torch.Generator(setup.device).manual_seed(i) for i in range(batch)]
    latents = torch.cat([torch.randn((1, *setup.latent_shape), generator=g, device=setup.device) for g in gens])
    latents = latents.to(setup.dtype)
    text = torch.randn((2 * batch, *setup.text_shape), generator=gens[0], device=setup.device).to(setup.dtype)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = predict(x, t, text).chunk(2)
        eps = uncond + GUIDANCE * (cond - uncond)
        latents = scheduler.step(eps, t, latents, eta=1.0, generator=gens).prev_sample
    return latents


# --- measurement -----------------------------------------------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once among those created inside the block (CPU or GPU).

    Each op output's storage is counted once while any tensor created here still refers to it (views and
    in-place results share their storage's count); weakref finalizers release it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self._refs:
            self._refs[key] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= nbytes


def weight_bytes(modules: list[nn.Module]) -> int:
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_bytes(setup: Setup, predict: Predict, modules: list[nn.Module], batch: int, steps: int) -> int:
    """The variant's weights + its peak transient allocation during one sampling run."""
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sample(setup, predict, batch, steps)
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - before
    else:
        with LiveTensorBytes() as tracker:
            sample(setup, predict, batch, steps)
        transient = tracker.peak
    return weight_bytes(modules) + transient


def seconds(setup: Setup, predict: Predict, batch: int, steps: int) -> float:
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sample(setup, predict, batch, steps)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(setup: Setup, batch: int, steps: int, repeats: int, warmup: bool = True) -> list[dict]:
    """Median seconds per image (interleaved repeats after one warm-up each) and peak memory per variant."""
    runs = variants(setup)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, (predict, _) in runs.items():
        if warmup:
            sample(setup, predict, batch, min(steps, 2))  # kernels, allocator
    for _ in range(repeats):
        for name, (predict, _) in runs.items():
            times[name].append(seconds(setup, predict, batch, steps) / batch)
    memory = {name: peak_bytes(setup, predict, mods, batch, steps) for name, (predict, mods) in runs.items()}
    return [{"setup": setup.name, "device": setup.device.type, "dtype": str(setup.dtype).replace("torch.", ""),
             "batch": batch, "variant": name, "s_per_image": statistics.median(times[name]),
             "spread": (max(times[name]) - min(times[name])) / statistics.median(times[name]),
             "peak_mb": memory[name] / 2**20} for name in runs]


# --- report ----------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    plain = {(r["setup"], r["dtype"], r["batch"]): r for r in rows if r["variant"] == "plain"}
    lines = ["| model | device | dtype | batch | variant | s/image | time vs plain | peak MB | memory vs plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = plain[(r["setup"], r["dtype"], r["batch"])]
        lines.append(f"| {r['setup']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['variant']} | "
                     f"{r['s_per_image']:.4f} (±{100 * r['spread'] / 2:.0f}%) | {r['s_per_image'] / p['s_per_image']:.2f} | "
                     f"{r['peak_mb']:.1f} | {r['peak_mb'] / p['peak_mb']:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), {gpu}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gpu-dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--cpu-sd15", action="store_true",
                        help="also run the SD1.5-sized UNet on CPU (float32, batch 1, no warm-up; ~1 min per step "
                             "for all variants on 2 cores): the memory ratio at real size without a GPU")
    parser.add_argument("--cpu-sd15-steps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    rows: list[dict] = []
    if not args.skip_cpu:
        setup = tiny_setup()
        for batch in args.cpu_batches:
            rows += measure(setup, batch, args.steps, args.repeats)
    if args.cpu_sd15:
        setup = sd15_setup(torch.device("cpu"), torch.float32)
        rows += measure(setup, 1, args.cpu_sd15_steps, repeats=1, warmup=False)
        del setup
        gc.collect()
    if torch.cuda.is_available():
        for dtype in args.gpu_dtypes:
            setup = sd15_setup(torch.device("cuda"), getattr(torch, dtype))
            for batch in args.gpu_batches:
                rows += measure(setup, batch, args.gpu_steps, args.gpu_repeats)
            del setup
            gc.collect()
            torch.cuda.empty_cache()
    else:
        print("GPU part skipped: no CUDA device (SD1.5-sized UNet, batch 1 and 8, fp16/bf16 need one)")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
