"""CLaRa's tensor-level pieces (no model code): the compression MSE, the straight-through
differentiable top-k over candidate documents, the selection it drives, recall@k, and the answer
loss in crb's convention (sum over target tokens / num_items)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crb.units import IGNORE

_LOGIT_BOUND = 1e30  # scores / T are clamped into +-this, so -inf scores stay finite
_TAKEN = -1e35  # log(1 - taken) where taken = 1: far below any clamped logit, still finite in float32


def clara_mse(hidden: torch.Tensor, attention_mask: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
    """MSE between each document's mean hidden state over attended non-memory positions and over
    attended memory positions (mean over dim), averaged over documents; float32.

    hidden (docs, seq, dim); attention_mask (docs, seq), 1 = attended; memory_mask (docs, seq) bool.
    A document without positions of one kind contributes a zero mean for that kind."""
    attended = attention_mask.bool()
    mem = (attended & memory_mask).float()
    non = (attended & ~memory_mask).float()
    h = hidden.float()
    mean_mem = torch.einsum("bs,bsd->bd", mem, h) / mem.sum(1, keepdim=True).clamp_min(1.0)
    mean_non = torch.einsum("bs,bsd->bd", non, h) / non.sum(1, keepdim=True).clamp_min(1.0)
    # Every document has the same dim, so the global mean is the mean over documents of the per-document mean.
    return F.mse_loss(mean_non, mean_mem)


def differentiable_topk(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Straight-through top-k: W (batch, k, n), in float32 (float64 for float64 scores).

    Forward: row j is the one-hot of the j-th highest score (distinct indices, descending order).
    Backward: through soft rows softmax(scores / T + log(1 - taken_j)), taken_j the detached sum of
    the hard one-hots of slots < j (log(0) clamped to a large finite negative), via
    W = hard + (soft - soft.detach()). Logits are clamped to +-1e30 so -inf scores give no NaN."""
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    idx = scores.detach().topk(k, dim=-1).indices  # sorted, descending
    dtype = torch.promote_types(scores.dtype, torch.float32)
    hard = F.one_hot(idx, n).to(dtype)  # (batch, k, n)
    taken = (hard.cumsum(1) - hard).detach()  # slot j: one-hots of slots < j
    logits = (scores.to(dtype) / temperature).clamp(-_LOGIT_BOUND, _LOGIT_BOUND)
    soft = torch.softmax(logits.unsqueeze(1) + torch.log1p(-taken).clamp_min(_TAKEN), dim=-1)
    return hard + (soft - soft.detach())


def select(W: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Weighted candidates: W (batch, k, n) x candidates (batch, n, d) -> (batch, k, d)."""
    return torch.einsum("bkn,bnd->bkd", W.to(candidates.dtype), candidates)


def recall_at_k(top_idx: torch.Tensor, gold: list[list[int]]) -> float:
    """Mean over examples of |gold_b & selected_b| / |gold_b|, where selected_b = set(top_idx[b]) and
    gold_b = set(gold[b]); examples without gold documents are left out (0.0 if none has any)."""
    per_example = [len(set(g) & set(row)) / len(set(g)) for row, g in zip(top_idx.tolist(), gold, strict=True) if g]
    return sum(per_example) / len(per_example) if per_example else 0.0


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Next-token cross-entropy summed over targets / num_items, as transformers' causal-LM loss with
    num_items_in_batch (crb's causal_lm): logits (batch, seq, vocab); labels (batch, seq), unshifted,
    -100 = no target; logits at t predict labels at t + 1. Float32."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device),
                            ignore_index=IGNORE, reduction="sum")
    if torch.is_tensor(num_items):
        num_items = num_items.to(total.device)
    return total / num_items


# ---------------------------------------------------------------- the registered losses (model, batch, num_items)


def _outputs(model: torch.nn.Module, batch: dict, num_items: torch.Tensor):
    """One CLaRa forward per batch, shared by the losses that read it (kept on the batch dict)."""
    if "_clara" not in batch:
        batch["_clara"] = model(batch, num_items)
        if batch["_clara"].recall is not None:  # stage 3: logged by the loop
            batch.setdefault("_metrics", {})["recall_at_k"] = batch["_clara"].recall
    return batch["_clara"]


def clara_generation(model: torch.nn.Module, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    """The decoder's answer loss (summed over answer tokens / num_items)."""
    return _outputs(model, batch, num_items).generation


def clara_mse_loss(model: torch.nn.Module, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    """clara_mse of the batch's compressed documents, as a share of the step (batch rows' weight)."""
    out = _outputs(model, batch, num_items)
    return out.mse * _rows_share(batch, num_items)


def _rows_share(batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    # the MSE is a per-document mean: weight it by this micro-batch's share of the step's target tokens, so the
    # accumulated sum over micro-batches is the step's mean, like the generation loss
    targets = (batch["dec_labels"][:, 1:] != IGNORE).sum()
    return targets / num_items
