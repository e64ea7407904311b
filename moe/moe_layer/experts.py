"""The routed experts' computation (the MoE layer's third stage, as megatron-core's
experts.py): a SwiGLU FFN per expert over its contiguous segment of rows.

Shape legend: M routed rows (contiguous per expert), D d_model, E experts held here,
F expert FFN size.

Expert weights (parameters of the layer): ``w13_ED2F`` holds gate (columns [:F]) and up
(columns [F:]) of every expert so one grouped GEMM computes both; ``w2_EFD`` is the down
projection.

The backend is chosen once, when the layer is built or moved (:func:`make_experts`):
  * :class:`GroupedMMExperts`: torch._grouped_mm over the segments with a hand-written
    backward, the routing weights folded into the activation; shapes torch._grouped_mm
    refuses (:func:`grouped_mm_aligned`) run the per-expert loop instead;
  * :class:`LoopExperts`: one dense SwiGLU per expert (the reference);
  * :class:`TritonExperts`: the Triton grouped SwiGLU MLP (kernels.grouped_mlp).
Each takes the dispatcher's :class:`~moe.moe_layer.dispatcher.ExpertRows` and the two
weights and returns y_MD; ``folds_weights(w2_EFD)`` says whether it wants each row's
routing weight (then y_MD rows carry it and the combine is a plain sum), ``pad_rows``
whether it wants each expert's segment padded to a multiple of that many rows (zero-weight
rows that add nothing: bf16 on CPU, see dispatcher.pad_segments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatcher import ExpertRows


class _GroupedSwiGLU(torch.autograd.Function):
    """y = (w * silu(x W_gate) * (x W_up)) W_down per expert segment (w: each row's routing
    weight when given, folded into the activation so the combine is a plain per-token sum),
    with a hand-written backward of four more grouped GEMMs:
        dW2 = (w a)^T dy,  d(wa) = dy W2^T,  dw = <a, d(wa)>,  da = w d(wa),
        dh = SwiGLU'(h) da,  dW13 = x^T dh,  dx = dh W13^T.
    Why: autograd's generic backward of torch._grouped_mm on CPU took 635 ms for a
    (32768 x 256) x (64 x 256 x 256) product whose three grouped GEMMs take 130 ms
    (measured here, torch 2.13). Folding w into the (M, F) activation instead of scaling
    the (M, D) output costs a pass over half the bytes and no saved copy of the output.
    Saves x, h = [gate | up], silu(gate) and a (not recomputed: each element-wise pass
    over (M, F) costs 1-3 ms on the 2-core CPU, a fifth to a third of a grouped GEMM).
    """

    @staticmethod
    def forward(ctx, x_MD, w13_ED2F, w2_EFD, offsets_E, weights_M):
        Fh = w2_EFD.shape[1]
        h_M2F = torch._grouped_mm(x_MD, w13_ED2F, offs=offsets_E)
        s_MF = F.silu(h_M2F[:, :Fh])
        a_MF = s_MF * h_M2F[:, Fh:]
        ctx.save_for_backward(x_MD, h_M2F, s_MF, a_MF, w13_ED2F, w2_EFD, offsets_E, weights_M)
        aw_MF = a_MF if weights_M is None else a_MF * weights_M.unsqueeze(1)
        return torch._grouped_mm(aw_MF, w2_EFD, offs=offsets_E)

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, h_M2F, s_MF, a_MF, w13_ED2F, w2_EFD, offs, w_M = ctx.saved_tensors
        Fh = w2_EFD.shape[1]
        dy_MD = dy_MD.contiguous()
        aw_MF = a_MF if w_M is None else a_MF * w_M.unsqueeze(1)
        dw2 = torch._grouped_mm(aw_MF.t(), dy_MD, offs=offs)
        da_MF = torch._grouped_mm(dy_MD, w2_EFD.transpose(-2, -1), offs=offs)
        dw_M = None
        if w_M is not None:
            dw_M = torch.linalg.vecdot(a_MF, da_MF) if ctx.needs_input_grad[4] else None
            da_MF.mul_(w_M.unsqueeze(1))
        # write both halves of dh in place: fewer full-size temporaries (these element-wise
        # passes over (M, 2F) cost as much as a GEMM on CPU)
        dh_M2F = torch.empty_like(h_M2F)
        torch.mul(da_MF, s_MF, out=dh_M2F[:, Fh:])
        torch.ops.aten.silu_backward.grad_input(da_MF.mul_(h_M2F[:, Fh:]), h_M2F[:, :Fh],
                                                grad_input=dh_M2F[:, :Fh])
        dw13 = torch._grouped_mm(x_MD.t(), dh_M2F, offs=offs)
        dx = torch._grouped_mm(dh_M2F, w13_ED2F.transpose(-2, -1), offs=offs)
        return dx, dw13, dw2, None, dw_M


def grouped_mm_aligned(w2_EFD: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these expert shapes: it needs every row stride a
    multiple of 16 bytes (torch 2.13: "strides should be multiple of 16 bytes"), so D and
    F (hence 2F) times the element size. A planned geometry such as d_model 42 in fp32
    is not; the layer then runs the per-expert loop instead."""
    F_, D = w2_EFD.shape[1], w2_EFD.shape[2]
    es = w2_EFD.element_size()
    return (D * es) % 16 == 0 and (F_ * es) % 16 == 0


def experts_grouped_mm(x_MD, offsets_E, w13_ED2F, w2_EFD, weights_M=None):
    """SwiGLU experts over contiguous segments via torch._grouped_mm (forward and backward).
    ``weights_M`` (one routing weight per row, optional) scales each row's output."""
    if weights_M is not None:
        weights_M = weights_M.to(x_MD.dtype)
    return _GroupedSwiGLU.apply(x_MD, w13_ED2F, w2_EFD, offsets_E, weights_M)


def experts_loop(x_MD, counts_E, w13_ED2F, w2_EFD):
    """Reference: one dense SwiGLU per expert segment."""
    Fh = w2_EFD.shape[1]
    outs, start = [], 0
    # unbind, not w[e]: indexing's backward would add a zero-filled (E, D, 2F) gradient
    # per expert (measured 4x slower at E=64); unbind's backward stacks once.
    for n, w13, w2 in zip(counts_E.tolist(), w13_ED2F.unbind(0), w2_EFD.unbind(0)):
        xe = x_MD[start:start + n]
        h = xe @ w13
        outs.append((F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2)
        start += n
    return torch.cat(outs, 0) if outs else x_MD.new_zeros(0, w2_EFD.shape[2])


# bf16/fp16 GEMMs on CPU run in oneDNN, which builds a primitive per new shape: segments
# padded to this many rows keep the set of shapes small (dispatcher.pad_segments)
CPU_LOW_PRECISION_PAD_ROWS = 16


class GroupedMMExperts:
    """torch._grouped_mm over the segments; each row's routing weight scales its
    activation. Shapes torch._grouped_mm refuses run :func:`experts_loop` (unweighted)."""

    def folds_weights(self, w2_EFD: torch.Tensor) -> bool:
        return grouped_mm_aligned(w2_EFD)

    def pad_rows(self, w2_EFD: torch.Tensor) -> int:
        """Segments a multiple of this many rows (0: unpadded): bf16/fp16 on CPU only (fp32
        CPU GEMMs measured the same padded or not; CUDA has no per-shape build)."""
        low = w2_EFD.dtype in (torch.bfloat16, torch.float16)
        if low and w2_EFD.device.type == "cpu" and self.folds_weights(w2_EFD):
            return CPU_LOW_PRECISION_PAD_ROWS
        return 0

    def __call__(self, rows: ExpertRows, w13_ED2F, w2_EFD) -> torch.Tensor:
        if grouped_mm_aligned(w2_EFD):
            return experts_grouped_mm(rows.x_MD, rows.offsets_E, w13_ED2F, w2_EFD, rows.weights_M)
        return experts_loop(rows.x_MD, rows.counts_E, w13_ED2F, w2_EFD)


class LoopExperts:
    """One dense SwiGLU per expert segment (the reference); the combine weights the rows."""

    def folds_weights(self, w2_EFD: torch.Tensor) -> bool:
        return False

    def pad_rows(self, w2_EFD: torch.Tensor) -> int:
        return 0

    def __call__(self, rows: ExpertRows, w13_ED2F, w2_EFD) -> torch.Tensor:
        return experts_loop(rows.x_MD, rows.counts_E, w13_ED2F, w2_EFD)


class TritonExperts:
    """The Triton grouped SwiGLU MLP (kernels.grouped_mlp), unchecked: the offsets come
    from a dispatcher (valid by construction), so no host synchronisation."""

    def folds_weights(self, w2_EFD: torch.Tensor) -> bool:
        return False

    def pad_rows(self, w2_EFD: torch.Tensor) -> int:
        return 0

    def __call__(self, rows: ExpertRows, w13_ED2F, w2_EFD) -> torch.Tensor:
        from kernels.grouped_mlp import grouped_swiglu_mlp_unchecked  # lazy: needs triton

        # the offsets end at the last row (no padding rows): no tail to zero
        return grouped_swiglu_mlp_unchecked(rows.x_MD, rows.offsets_E, w13_ED2F, w2_EFD,
                                            tail=False)


def make_experts(backend: str, dispatch: str):
    """The experts of a backend ("torch" or "triton") and moe.dispatch ("grouped_mm" or
    "loop", for the torch backend)."""
    if backend == "triton":
        return TritonExperts()
    return LoopExperts() if dispatch == "loop" else GroupedMMExperts()
