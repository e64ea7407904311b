"""Input validation shared by the public kernel functions: clear errors, not memory faults."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}: allowed float32, bfloat16, float16")


def check_index(name: str, t: torch.Tensor, upper: int) -> None:
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} has dtype {t.dtype}: allowed int64 or int32")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(f"{name} has values outside [0, {upper}): min {int(t.min())}, "
                         f"max {int(t.max())}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}: expected {tuple(shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError(f"tensors on different devices: {devs}")


def check_route_args(n_experts: int, top_k: int, n_groups: int, topk_groups: int) -> None:
    """The routing constraints shared by moe.route and kernels.route (same messages)."""
    E = n_experts
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} is invalid: allowed 1..{E} (number of experts)")
    if n_groups < 1 or E % n_groups:
        raise ValueError(f"n_groups={n_groups} is invalid: allowed a divisor of {E} experts")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups={topk_groups} is invalid: allowed 1..{n_groups}")
    if top_k > topk_groups * (E // n_groups):
        raise ValueError(f"top_k={top_k} is invalid: at most topk_groups * experts per group "
                         f"= {topk_groups * (E // n_groups)}")


def check_2d(name: str, t: torch.Tensor, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {dims}, got shape {tuple(t.shape)}")


def check_offsets(name: str, offs: torch.Tensor, n_experts: int, n_rows: int,
                  allow_tail: bool) -> None:
    """Segment ENDS: int32/int64 of shape (E,), non-negative, non-decreasing, last == M
    (or <= M when trailing padding rows are allowed). Reads the values: one host sync."""
    if not isinstance(offs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(offs).__name__}")
    if offs.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} has dtype {offs.dtype}: allowed int32 or int64")
    if tuple(offs.shape) != (n_experts,):
        raise ValueError(f"{name} has shape {tuple(offs.shape)}: expected ({n_experts},) "
                         "(one segment end per expert)")
    if n_experts == 0:
        return
    o = offs.detach().to("cpu", torch.int64)
    if int(o[0]) < 0 or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"{name} must be non-negative and non-decreasing segment ends, got "
                         f"{o.tolist()[:16]}{' ...' if n_experts > 16 else ''}")
    last = int(o[-1])
    if last > n_rows or (not allow_tail and last != n_rows):
        want = f"<= M={n_rows}" if allow_tail else f"== M={n_rows} (the number of rows)"
        raise ValueError(f"{name}[-1]={last}: expected {want}")
