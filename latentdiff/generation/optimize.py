"""The fast path: ``pipe.optimize()``.

What it does to the pipeline, in place (each a switch of ``FastOptions``):

- **half precision** on CUDA: float16 unless the pipeline already runs in bfloat16. Both have the
  same tensor-core rate on Ampere / Hopper; float16 keeps 3 more mantissa bits (closer to the
  float32 result) and SD 1.x / 2.x are routinely run in it. The VAE decoder, which can overflow in
  float16, is retried in float32 when it does (vae.py). On CPU the dtype is left alone.
- **channels_last** memory format for the U-Net and the VAE (NHWC convolutions are the fast
  cuDNN / oneDNN layout).
- **fused QKV projections** (diffusers' ``fuse_qkv_projections``): one GEMM for q, k, v in
  self-attention and one for k, v in cross-attention instead of three / two.
- **torch.compile** of the U-Net and of the VAE decoder. The U-Net runs 50 times per image with the
  same shapes, so on CUDA it gets ``mode="reduce-overhead"`` (inductor kernels replayed as one CUDA
  graph: no per-kernel launch cost); the decoder runs once per batch and gets the default mode
  (a CUDA graph there would only hold a second copy of its large activations). Shapes are static
  (``dynamic=False``): each new shape (batch size, resolution) compiles once, and the first call
  with it is timed and recorded in ``pipe.compile_report`` (and logged).

The denoising loop itself reads timesteps from a host copy (sampling.py), so no step waits for
the GPU, on the fast path or the default one.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import InvalidInputError
from ..models.hashing import weights_fingerprint

log = logging.getLogger("latentdiff")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class FastOptions:
    """Switches of the fast path; the defaults are what ``pipe.optimize()`` and ``--fast`` do."""

    compile: bool = True
    dtype: str | None = None  # "float16" / "bfloat16" / "float32"; None: float16 on CUDA if float32 now
    channels_last: bool = True
    fuse_qkv: bool = True
    compile_vae: bool = True
    mode: str | None = None  # U-Net compile mode; None: "reduce-overhead" on CUDA, else the default
    vae_mode: str | None = None  # VAE decoder compile mode; None: the default mode
    backend: str = "inductor"  # "eager" / "aot_eager" check the graph capture without code generation
    fullgraph: bool = False  # True: fail instead of splitting the U-Net graph (a test asserts it needs no split)

    def check(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.backend, str) or self.backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise InvalidInputError(
                f"unknown torch.compile backend {self.backend!r}; use inductor (or eager / aot_eager to debug)"
            )


@dataclass(frozen=True)
class CompileRecord:
    """The first call of a compiled module with new input shapes: which module, for which shapes,
    how long it took (tracing + code generation + one run), and whether torch.compile made a graph
    at all (it makes none when dynamo is disabled, e.g. TORCH_COMPILE_DISABLE=1, or has reached its
    recompile limit: the module then runs eagerly)."""

    module: str
    shapes: tuple  # ((shape, dtype name), ...) of the tensor inputs
    dtype: str  # of the module's weights
    seconds: float
    compiled: bool = True

    def __str__(self) -> str:
        shapes = ", ".join(("x".join(map(str, s)) or "scalar") + f" {d}" for s, d in self.shapes)
        if not self.compiled:
            return (f"{self.module} not compiled for inputs ({shapes}) {self.dtype}: torch.compile made no graph "
                    "(dynamo is disabled or at its recompile limit), so it runs eagerly")  # fmt: skip
        return f"compiled {self.module} for inputs ({shapes}) {self.dtype} in {self.seconds:.1f} s"


def optimize(pipe, options: FastOptions = FastOptions()):
    """Apply the fast path to ``pipe`` in place (see the module docstring); returns ``pipe``.

    Calling it again with the same options does nothing; with other options it is an error (load
    the model again instead: fusing and compiling are not undone).
    """
    options.check()
    if pipe.fast_options is not None:
        if pipe.fast_options == options:
            return pipe
        raise InvalidInputError("this pipeline is already optimized with other options; load the model again")
    device = pipe.device
    dtype = _target_dtype(options.dtype, device, pipe.dtype)
    if dtype != pipe.dtype:
        pipe.to(dtype=dtype)
    # The weight hash names the model's weights: fusing adds derived to_qkv / to_kv copies, which
    # must not change it, so it is taken now and kept for the fused modules.
    weights_hash = pipe.weight_hash()
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        for net in (pipe.unet, pipe.vae):
            if _hooked_projections(net):
                warnings.warn(
                    f"{type(net).__name__} has hooks on its q/k/v projections (LoRA adapters applied as hooks); "
                    "fused projections would bypass them, so they are not fused. Fuse the LoRA into the weights "
                    "first for the full fast path",
                    stacklevel=3,
                )
            else:
                net.fuse_qkv_projections()
    pipe._hash = (weights_fingerprint(module for _, module in pipe.networks()), weights_hash)
    if options.compile:
        cuda = device.type == "cuda"
        unet_mode = options.mode if options.mode is not None else ("reduce-overhead" if cuda else None)
        _compile(pipe, "unet", pipe.unet, unet_mode, options)
        if options.compile_vae:
            _compile(pipe, "vae.decoder", pipe.vae.decoder, options.vae_mode, options)
    pipe.fast_options = options
    return pipe


def _hooked_projections(net: torch.nn.Module) -> bool:
    names = ("to_q", "to_k", "to_v")
    return any(m._forward_hooks or m._forward_pre_hooks for n, m in net.named_modules() if n.endswith(names))


def _target_dtype(name: str | None, device: torch.device, current: torch.dtype) -> torch.dtype:
    if name is not None:
        return DTYPES[name]
    if device.type == "cuda" and current == torch.float32:
        return torch.float16
    return current


def _compile(pipe, name: str, module: torch.nn.Module, mode: str | None, options: FastOptions) -> None:
    # The compiled function replaces the instance's forward: state_dict, config and the module
    # itself stay as they are (saving, hashing and diffusers' code see the plain module).
    module.forward = CompiledForward(name, module, pipe.compile_report, mode, options)


class CompiledForward:
    """``module.forward`` through ``torch.compile``, timing the first call of each input signature.

    Calls whose parameters are not in the dtype compiled for (the VAE's float32 retry) run eagerly
    instead of compiling a second variant. Under CUDA graphs (``reduce-overhead``) the outputs live
    in a buffer the next replay overwrites, so they are cloned (one latent-sized copy per step).
    """

    def __init__(self, name: str, module: torch.nn.Module, report: list, mode: str | None, options: FastOptions):
        self.name = name
        self.eager = module.forward
        self.param = next(module.parameters())
        self.dtype = self.param.dtype
        self.report = report
        self.cudagraphs = mode is not None and "reduce-overhead" in mode
        self.compiled = torch.compile(
            self.eager, mode=mode, backend=options.backend, fullgraph=options.fullgraph, dynamic=False
        )
        self.seen: set = set()

    def __call__(self, *args: Any, **kwargs: Any):
        if self.param.dtype != self.dtype:
            return self.eager(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        key = tuple((tuple(t.shape), t.dtype, t.device.type) for t in tensors)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.seen:
            out = self.compiled(*args, **kwargs)
        else:
            device = tensors[0].device if tensors else torch.device("cpu")
            graphs = _graphs_made()
            _sync(device)
            start = time.perf_counter()
            out = self.compiled(*args, **kwargs)
            _sync(device)
            self.seen.add(key)
            shapes = tuple((k[0], _name(k[1])) for k in key)
            record = CompileRecord(self.name, shapes, _name(self.dtype), time.perf_counter() - start,
                                   compiled=_graphs_made() > graphs)  # fmt: skip
            self.report.append(record)
            log.info("latentdiff: %s", record)
        if self.cudagraphs:
            out = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)
        return out


def _graphs_made() -> int:
    """Graphs dynamo has captured in this process so far (its own statistics counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
