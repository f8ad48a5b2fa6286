"""The student's vocabulary head fused with its losses, chunk by chunk (no (n, V) tensor held).

Today's path runs the head on every position, keeps the (n, V) logits for backward and a float32
copy inside the KD loss: ~6 GB per 32 k tokens at V = 30,522. Here the head runs only on the rows
some loss needs, `chunk_tokens` rows at a time; each chunk's loss and its gradient with respect to
the chunk's logits are computed in the forward pass (any loss: exact KD, the sparse modes, MLM),
and turned at once into the gradients of the head's input, weight and bias. Backward only scales
them (the loss is a scalar). Memory: one chunk's logits and the loss's own buffers, plus a
float32 copy of the weight's gradient. Compute: the same three GEMMs as the unfused head.
(Liger's FusedLinearCrossEntropy and ModelOpt's flash_kd do the same for one loss each.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cache_format.settings import IGNORE_INDEX
from student_train import losses
from student_train.config import LossConfig
from student_train.losses import ExactHead

ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]
"""(chunk logits (c, V), first row, end row) -> the chunk's scalar contribution to the loss."""


def chunked_head_loss(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, loss: ChunkLoss, chunk_tokens: int
) -> torch.Tensor:
    """sum over chunks of loss(features[a:b] @ weightᵀ + bias, a, b): a scalar whose gradient
    reaches `features`, `weight` and `bias` as if the (n, V) logits had been built at once."""
    return _ChunkedHead.apply(features, weight, bias, loss, chunk_tokens)


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, loss, chunk_tokens):
        x, w = features.detach(), weight.detach()
        b = None if bias is None else bias.detach()
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        grad_b = None if b is None else torch.zeros(b.shape, dtype=torch.float32, device=b.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for a in range(0, x.shape[0], chunk_tokens):
            end = min(a + chunk_tokens, x.shape[0])
            with torch.enable_grad():
                logits = F.linear(x[a:end], w, b).requires_grad_()
                value = loss(logits, a, end)
                if not value.requires_grad:  # no loss at these rows
                    grad_x[a:end] = 0
                    continue
                (grad,) = torch.autograd.grad(value, logits)
            total += value.detach().float()
            torch.mm(grad, w, out=grad_x[a:end])
            if grad.dtype == torch.float32:  # accumulate in place: no (V, H) temporary per chunk
                grad_w.addmm_(grad.T, x[a:end])
            else:
                grad_w += (grad.T @ x[a:end]).float()
            if grad_b is not None:
                grad_b += grad.float().sum(0)
            del logits, grad
        ctx.save_for_backward(grad_x, grad_w, *(() if grad_b is None else (grad_b,)))
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, *rest = ctx.saved_tensors
        g = grad_out.float()
        grad_b = (rest[0] * g).to(ctx.dtypes[1]) if rest else None
        grad_w = grad_w.mul_(g).to(ctx.dtypes[0])  # in place: the forward's buffers are not needed any more
        return grad_x.mul_(g.to(grad_x.dtype)), grad_w, grad_b, None, None


class HeadLoss:
    """The `ChunkLoss` of a training step: scale_kd x KD at the rows `kd_rows` marks plus scale_mlm x
    the MLM cross-entropy at the rows with a label, the two sums kept in `kd` and `mlm` for the log.
    `teacher` holds the KD mode's fields at the same rows (or `logits`, the online teacher's)."""

    def __init__(
        self,
        kd_rows: torch.Tensor,
        labels: torch.Tensor,
        teacher: dict[str, torch.Tensor],
        loss_cfg: LossConfig,
        exact: ExactHead | None,
        scale: tuple[float, float],
    ):
        self.kd_rows, self.labels, self.teacher, self.cfg, self.exact = kd_rows, labels, teacher, loss_cfg, exact
        self.scale_kd, self.scale_mlm = scale
        self.kd = self.mlm = torch.zeros((), dtype=torch.float64, device=labels.device)

    def __call__(self, logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        kd_rows = self.kd_rows[a:b]
        if self.scale_kd > 0 and bool(kd_rows.any()):
            pick = (lambda x: x[a:b]) if bool(kd_rows.all()) else (lambda x: x[a:b][kd_rows])
            s = logits if bool(kd_rows.all()) else logits[kd_rows]
            t = {name: pick(v) for name, v in self.teacher.items()}
            if "logits" in t:  # the online teacher
                kd = losses.kd_full(s, t["logits"], self.cfg.temperature).sum()
            else:
                kd = losses.KD_LOSSES[self.cfg.kd_mode](s, t, self.cfg.temperature, self.exact).sum()
            self.kd = self.kd + kd.detach()
            total = total + self.scale_kd * kd
        labels = self.labels[a:b]
        masked = labels != IGNORE_INDEX
        if self.scale_mlm > 0 and bool(masked.any()):
            mlm = F.cross_entropy(logits[masked].float(), labels[masked], reduction="sum")
            self.mlm = self.mlm + mlm.detach()
            total = total + self.scale_mlm * mlm
        return total
