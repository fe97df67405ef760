"""The one training loop of embedtl's heads: V variants of one head network, trained together.

A group of variants that differ only in learning rate, weight decay and label smoothing (see
:meth:`HeadConfig.batch_key`) trains as one batched model: every layer's weights are stacked
(V, out, in), every step reads one shared feature batch, the first layer of all variants is one
matrix product (B, D) x (D, V*out) and deeper layers are one batched product each. A single
fit is the same loop with V = 1, so "many heads in one pass" and "one head" cannot drift apart.

Mini-batches are index permutations of an in-memory tensor (or shuffled blocks of a streamed
split), never a per-sample DataLoader. AdamW (per-variant learning rate and weight decay), linear
warm-up then cosine decay per step, label smoothing, optional class weights. After every epoch
every variant is scored on the **validation** split only; each keeps its best epoch's weights
and stops on its own after ``patience`` epochs without a better val accuracy (at most 500k rows'
worth: :func:`patience_epochs`; stopped variants leave the batch). The test split never enters
this module.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .._device import cpu_threads_for
from ..errors import HeadError
from ._config import HeadConfig
from ._data import Split, pass_rows
from ._modules import ACTIVATION_FUNCTIONS

__all__ = [
    "TrainResult",
    "StackedNet",
    "train",
    "auto_batch_size",
    "patience_epochs",
    "warmup_cosine",
    "class_weights",
]

_BETAS = (0.9, 0.999)
_EPS = 1e-8
_SCORE_FLOATS = 1 << 24  # activations per scoring chunk (64 MiB of float32)
#: Patience is counted in epochs but never spans more training rows than this: at a million
#: rows an epoch is ~800 steps, and 6 epochs without a better val accuracy are 6 wasted passes.
PATIENCE_ROWS = 500_000


def patience_epochs(patience: int, n_train: int) -> int:
    """Epochs without a better val accuracy before stopping: ``patience``, fewer on large
    splits (at most :data:`PATIENCE_ROWS` rows' worth, at least one epoch)."""
    return max(1, min(patience, math.ceil(PATIENCE_ROWS / max(n_train, 1))))


@dataclass
class TrainResult:
    """How one variant's training went; a new one (every field at its default) is filled in
    epoch by epoch."""

    best_epoch: int = 0  # 1-based; 0 before the first epoch
    epochs: int = 0  # epochs run (early stopping may end before config.epochs)
    seconds: float = 0.0  # wall time of the (shared) pass when this variant stopped
    seconds_to_best: float = 0.0
    #: this variant's share of the pass: each epoch split among the active variants
    share_seconds: float = 0.0
    val_accuracy: float | None = None
    val_loss: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    val_predictions: torch.Tensor | None = None  # (n_val,) classes predicted at the best epoch
    #: the epoch whose loss was not finite (the variant stopped there, its best epoch before it
    #: kept), or None
    diverged: int | None = None


def warmup_cosine(step: int, warm: int, total: int) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warm-up over ``warm`` steps, then
    cosine decay to zero at ``total``. The schedule of heads and of fine-tuning."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def auto_batch_size(n: int) -> int:
    """Rows per step when not given: n/32 rounded to a power of two, within 16..1024, so a small
    training set still gets ~32 steps per epoch and a large one fills the vector units."""
    return int(min(1024, max(16, 2 ** round(math.log2(max(n, 1) / 32)))))


class StackedNet(nn.Module):
    """V copies of a linear or MLP head network with stacked weights: (B, D) -> (V, B, C).

    Built from one network (``nn.Linear`` or the MLP's ``nn.Sequential``), every copy starting
    from its weights. Dropout masks are drawn once per step with the shape one network would
    draw, (B, H), and shared by the copies: each variant sees exactly the masks it would see
    trained alone with the same seed.
    """

    def __init__(
        self, net: nn.Module, n: int, activation: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        self.weights = nn.ParameterList(
            [nn.Parameter(m.weight.detach().unsqueeze(0).repeat(n, 1, 1)) for m in linears]
        )  # (V, out, in) each
        self.biases = nn.ParameterList(
            [nn.Parameter(m.bias.detach().unsqueeze(0).repeat(n, 1)) for m in linears]
        )  # (V, out) each
        self.activation = activation
        self.dropout = dropout
        self._refresh()

    def _refresh(self) -> None:
        """The (weight, bias) of each layer as a plain list: a step reads them a few times, and
        walking the ParameterLists each time cost more than a small head's arithmetic."""
        self.layers = list(zip(self.weights, self.biases, strict=True))

    def _apply(self, fn, *args, **kwargs):
        """As nn.Module's (``.to``, ``.cpu``, ...), the layer list following the parameters."""
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    @property
    def n(self) -> int:
        """The number of variants V."""
        return self.layers[0][0].shape[0]

    @property
    def widths(self) -> list[int]:
        """Each layer's output width (the last one: the classes)."""
        return [w.shape[1] for w, _ in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (V, B, C)
        """Class scores of every variant."""
        v, b = self.n, x.shape[0]
        act = ACTIVATION_FUNCTIONS[self.activation]
        h = x
        last = len(self.layers) - 1
        for i, (w, bias) in enumerate(self.layers):
            out = w.shape[1]
            if i == 0:  # one product for every variant: (B, D) x (D, V*out)
                h = (x @ w.reshape(v * out, -1).T).view(b, v, out).transpose(0, 1)
                h = h + bias.unsqueeze(1)  # (V, B, out)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))  # (V, B, out)
            if i < last:
                h = act(h)
                if self.training and self.dropout > 0:
                    mask = F.dropout(torch.ones(b, out, device=x.device), self.dropout)  # (B, H)
                    h = h * mask
        return h

    @torch.no_grad()
    def select(self, keep: Sequence[int]) -> None:
        """Keep only the variants ``keep`` (local indices), in that order."""
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.weights[0].device)
        for plist in (self.weights, self.biases):
            for j, p in enumerate(plist):
                plist[j] = nn.Parameter(p.index_select(0, idx))
        self._refresh()

    @torch.no_grad()
    def unstack(self, i: int, template: nn.Module) -> nn.Module:
        """Variant ``i`` as a plain network shaped like ``template`` (a deep copy, on the CPU)."""
        net = copy.deepcopy(template).cpu()
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        for m, w, b in zip(linears, self.weights, self.biases, strict=True):
            m.weight.copy_(w[i])
            m.bias.copy_(b[i])
        return net.eval()

    def parameter_count(self) -> int:
        """Parameters of one variant."""
        return sum(p[0].numel() for p in (*self.weights, *self.biases))


class _StackedAdamW:
    """torch.optim.AdamW's update for stacked parameters, with a learning rate and a weight
    decay per variant (the leading axis). Weight decay applies to weight matrices only.

    The moments, the step's gradients and its update each live in one (V, P) buffer (P: one
    variant's parameters), each parameter's part a view of it, so a step is about a dozen
    tensor operations whatever the depth of the network: at a few thousand rows a step's
    arithmetic takes microseconds and the per-operation overhead was most of its cost. Memory:
    4 x the parameters (the gradient buffer is reused for the denominator). Every element's
    arithmetic is torch.optim.AdamW's, unchanged."""

    def __init__(self, net: StackedNet, lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
        self.net, self.lr, self.wd, self.t = net, lr, weight_decay, 0
        size = sum(w[0].numel() + b[0].numel() for w, b in net.layers)
        self.m = torch.zeros(net.n, size, device=lr.device)  # (V, P) first moments
        self.v = torch.zeros_like(self.m)  # (V, P) second moments
        self._bind()

    def _bind(self) -> None:
        """The parameters in buffer order (weights first), the step's buffers, and each
        parameter's (update, denominator) views of them."""
        weights = [w for w, _ in self.net.layers]
        self.params = weights + [b for _, b in self.net.layers]
        self.grad = torch.empty_like(self.m)  # (V, P) gradients, then the denominators
        self.update = torch.empty_like(self.m)  # (V, P)
        views, at = [], 0
        for p in self.params:
            cut = slice(at, at + p[0].numel())
            u, d = self.update[:, cut].view(p.shape), self.grad[:, cut].view(p.shape)
            views.append((p, u, d, p.ndim == 3))  # weights (V, out, in) decay, biases do not
            at = cut.stop
        self.views = views

    @torch.no_grad()
    def step(self, scale: float) -> None:
        """One AdamW update of every variant, at ``scale`` times its learning rate."""
        self.t += 1
        b1, b2 = _BETAS
        c1, c2 = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        lr = self.lr * scale  # (V,)
        decay = (1 - lr * self.wd).view(-1, 1, 1)  # weight matrices only
        grad = torch.cat([p.grad.reshape(p.shape[0], -1) for p in self.params], 1, out=self.grad)
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        torch.mul(self.m, (-lr / c1).view(-1, 1), out=self.update)
        torch.sqrt(self.v, out=self.grad).div_(c2).add_(_EPS)  # the gradients are spent
        for p, update, denom, decays in self.views:
            if decays:
                p.mul_(decay)
            p.addcdiv_(update, denom)
            p.grad = None

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the variants ``keep`` (local indices), in that order (after the network's
        own :meth:`StackedNet.select`)."""
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.lr.device)
        self.lr, self.wd = self.lr[idx], self.wd[idx]
        self.m, self.v = self.m[idx], self.v[idx]
        self._bind()


def _loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    smoothing: torch.Tensor | None,
    class_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Per-variant cross-entropy (V,) of logits (V, B, C), as nn.CrossEntropyLoss computes it
    with a label smoothing per variant and optional class weights."""
    v, b, c = logits.shape
    logp = F.log_softmax(logits, dim=2)
    nll = -logp.gather(2, y.view(1, b, 1).expand(v, b, 1)).squeeze(2)  # (V, B)
    if class_weight is None:
        loss = nll.mean(1)
        smooth = None if smoothing is None else -logp.sum(2).mean(1)
    else:
        wy = class_weight[y]  # (B,)
        loss = (nll * wy).sum(1) / wy.sum()
        smooth = None if smoothing is None else -(logp * class_weight).sum(2).sum(1) / wy.sum()
    if smoothing is not None:
        loss = (1 - smoothing) * loss + smoothing / c * smooth
    return loss


@torch.no_grad()
def score(net: StackedNet, split: Split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(accuracy (V,), mean cross-entropy (V,), predictions (V, n)) of every variant."""
    was = net.training
    net.eval()
    v, c = net.n, net.widths[-1]
    # a chunk's activations and its features (float32, normalised: a copy) stay bounded
    rows = max(64, min(_SCORE_FLOATS // (v * max(net.widths)), pass_rows(split.dim)))
    correct = torch.zeros(v, dtype=torch.long)
    loss = torch.zeros(v, dtype=torch.float64)
    preds = []
    for x, y in split.batches(rows, None):
        logits = net(x)  # (V, b, C)
        ce = F.cross_entropy(logits.reshape(-1, c), y.repeat(v), reduction="none").view(v, -1)
        loss += ce.sum(1, dtype=torch.float64).cpu()
        p = logits.argmax(2)
        correct += (p == y).sum(1).cpu()
        preds.append(p.cpu())
    net.train(was)
    n = max(split.n, 1)
    pred = torch.cat(preds, 1) if preds else torch.zeros(v, 0, dtype=torch.long)
    return correct.double() / n, loss / n, pred


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``balanced`` class weights n / (C * n_c) of training labels (heads and fine-tuning)."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes).double()
    w = counts.sum() / (n_classes * counts.clamp_min(1))
    return w.float()


def train(
    net: nn.Module,
    configs: Sequence[HeadConfig],
    train_split: Split,
    val_split: Split | None,
    n_classes: int,
    progress: bool = False,
) -> tuple[StackedNet, list[TrainResult]]:
    """Train one copy of ``net`` per config, side by side; the configs must share a batch key.

    The splits hold normalised features (the head's normalisation applied already). Returns
    the stacked network holding each variant's best-val-epoch weights (in the order of
    ``configs``) and one :class:`TrainResult` per variant.
    """
    from .._progress import progress_bar

    if not configs:
        raise HeadError("no head variants to train")
    cfg = configs[0]
    if any(c.batch_key() != cfg.batch_key() for c in configs):
        raise HeadError("internal error: variants of different batch keys trained together")
    t0 = time.perf_counter()
    device = train_split.labels.device
    n_var = len(configs)
    stacked = StackedNet(net, n_var, cfg.activation, cfg.dropout if cfg.kind == "mlp" else 0.0)
    stacked.to(device).train()
    best = copy.deepcopy(stacked)  # each variant's best weights, in the order of configs
    f32 = {"dtype": torch.float32, "device": device}
    opt = _StackedAdamW(
        stacked,
        torch.tensor([c.lr for c in configs], **f32),
        torch.tensor([c.weight_decay for c in configs], **f32),
    )
    ls = [c.label_smoothing for c in configs]
    smoothing = torch.tensor(ls, **f32) if any(ls) else None
    weight = class_weights(train_split.labels, n_classes).to(device) if cfg.class_weight else None

    gen = torch.Generator().manual_seed(cfg.seed)
    batch = cfg.batch_size or auto_batch_size(train_split.n)
    steps_per_epoch = -(-train_split.n // batch)
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    patience = patience_epochs(cfg.patience, train_split.n)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, warm, total)

    active = list(range(n_var))  # global index of each local variant
    best_key: list[tuple[float, float] | None] = [None] * n_var
    results = [TrainResult() for _ in configs]
    has_val = val_split is not None and val_split.n > 0
    step = 0
    desc = f"fit {cfg.kind}" + (f" x{n_var}" if n_var > 1 else "")
    bar = progress_bar(
        range(1, cfg.epochs + 1), desc=desc, unit="epoch", progress=progress, leave=False
    )
    # the largest product of a step: small ones run on one CPU thread (cpu_threads_for)
    step_macs = batch * max(stacked.widths) * max(train_split.dim, max(stacked.widths)) * n_var
    # dropout draws from the global generator: fork it so training is seeded and leaves no trace
    with (
        cpu_threads_for(step_macs, device.type),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        torch.manual_seed(cfg.seed)
        for epoch in bar:
            t_epoch = time.perf_counter()
            losses, sizes = [], []
            scale = 1.0
            for x, y in train_split.batches(batch, gen):
                loss = _loss(stacked(x), y, smoothing, weight)  # (V,)
                loss.sum().backward()  # variants share no parameters: each gets its own gradient
                scale = lr_at(step)
                opt.step(scale)
                step += 1
                losses.append(loss.detach())
                sizes.append(len(y))
            train_loss = _mean_loss(losses, sizes, len(active))
            if has_val:
                acc, vloss, pred = score(stacked, val_split)
            now = time.perf_counter() - t0
            share = (time.perf_counter() - t_epoch) / len(active)
            keep, improved = [], []
            for j, g in enumerate(active):
                r = results[g]
                r.epochs, r.seconds = epoch, now
                r.share_seconds += share
                point = {"epoch": epoch, "train_loss": train_loss[j], "lr": configs[g].lr * scale}
                if not math.isfinite(train_loss[j]) or (has_val and not vloss[j].isfinite()):
                    r.diverged = epoch  # NaN or inf weights: stopped, its best epoch stays
                    continue
                if has_val:
                    a, lo = float(acc[j]), float(vloss[j])
                    point.update(val_accuracy=a, val_loss=lo)
                    if best_key[g] is None or (a, -lo) > best_key[g]:
                        best_key[g] = (a, -lo)
                        r.best_epoch, r.seconds_to_best = epoch, now
                        r.val_accuracy, r.val_loss = a, lo
                        r.val_predictions = pred[j].to(_index_dtype(n_classes))
                        improved.append((j, g))
                else:
                    r.best_epoch, r.seconds_to_best = epoch, now
                    improved.append((j, g))
                point["seconds"] = now
                r.curve.append(point)
                if epoch - r.best_epoch < patience:
                    keep.append(j)
            if improved:
                _copy_variants(stacked, best, improved)
            if has_val:
                bar.set_postfix(val_acc=f"{float(acc.max()):.4f}", active=len(keep))
            if not keep:
                break
            if len(keep) < len(active):  # stopped variants leave the batch
                stacked.select(keep)
                opt.select(keep)
                active = [active[j] for j in keep]
                smoothing = smoothing[keep] if smoothing is not None else None
    setup = (time.perf_counter() - t0) - sum(r.share_seconds for r in results)
    for r in results:  # building, copying and scoring outside the epochs: shared evenly
        r.share_seconds += max(setup, 0.0) / n_var
    best.eval()
    return best, results


def _mean_loss(losses: list[torch.Tensor], sizes: list[int], n_var: int) -> list[float]:
    """Each variant's mean training loss over an epoch's steps (weighted by batch size, summed
    in float64), read from the device once per epoch rather than once per step."""
    if not losses:
        return [0.0] * n_var
    per_step = torch.stack(losses).double().cpu().tolist()  # (steps, V)
    total = [0.0] * n_var
    for row, size in zip(per_step, sizes, strict=True):
        for j, value in enumerate(row):
            total[j] += value * size
    seen = sum(sizes)
    return [t / seen for t in total]


def _index_dtype(n_classes: int) -> torch.dtype:
    return torch.int16 if n_classes < 2**15 else torch.int32


@torch.no_grad()
def _copy_variants(src: StackedNet, dst: StackedNet, pairs: list[tuple[int, int]]) -> None:
    """dst[g] = src[j] for each (local j, global g)."""
    j = torch.as_tensor([p[0] for p in pairs], device=src.weights[0].device)
    g = torch.as_tensor([p[1] for p in pairs], device=src.weights[0].device)
    for a, b in zip((*src.weights, *src.biases), (*dst.weights, *dst.biases), strict=True):
        b.index_copy_(0, g, a.index_select(0, j))
