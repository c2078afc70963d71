"""CLaRa's tensor pieces: compression MSE, straight-through top-k, selection, recall@k, answer loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crb.losses.clara import answer_loss, clara_mse, differentiable_topk, recall_at_k, select


def loop_mse(hidden: torch.Tensor, attn: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    per_doc = []
    for d in range(hidden.shape[0]):
        m_rows = [hidden[d, s].double() for s in range(hidden.shape[1]) if attn[d, s] == 1 and mem[d, s]]
        n_rows = [hidden[d, s].double() for s in range(hidden.shape[1]) if attn[d, s] == 1 and not mem[d, s]]
        mean_m, mean_n = sum(m_rows) / len(m_rows), sum(n_rows) / len(n_rows)
        per_doc.append(((mean_n - mean_m) ** 2).mean())
    return sum(per_doc) / len(per_doc)


def test_clara_mse_matches_loop():
    g = torch.Generator().manual_seed(0)
    docs, seq, dim = 4, 12, 8
    hidden = torch.randn(docs, seq, dim, generator=g)
    attn = torch.ones(docs, seq, dtype=torch.long)
    attn[1, 7:9] = 0  # padding inside the document part
    attn[2, :3] = 0  # left padding
    attn[3, -1] = 0  # a padded memory position
    mem = torch.rand(docs, seq, generator=g) < 0.3
    mem[:, -3:] = True
    mem[:, 3] = False  # at least one attended non-memory position per document
    value = clara_mse(hidden, attn, mem)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), loop_mse(hidden, attn, mem), atol=1e-6)
    # bf16 input is computed in float32
    assert clara_mse(hidden.bfloat16(), attn, mem).dtype == torch.float32


def test_clara_mse_zero_when_means_coincide():
    v = torch.randn(3, 1, 5)
    hidden = v.expand(3, 10, 5).clone()
    hidden[:, 9] = 123.0  # padded: ignored
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[:, 9] = 0
    mem = torch.zeros(3, 10, dtype=torch.bool)
    mem[:, 6:] = True
    assert clara_mse(hidden, attn, mem).item() == pytest.approx(0.0, abs=1e-12)


def soft_rows(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """clara.md's soft construction, slot by slot."""
    taken = torch.zeros_like(scores)
    rows = []
    for _ in range(k):
        logits = scores / temperature + torch.log(1 - taken).clamp(min=-1e4)
        rows.append(torch.softmax(logits, dim=-1))
        best = torch.where(taken > 0, torch.full_like(scores, -float("inf")), scores.detach()).argmax(-1)
        taken = taken + F.one_hot(best, scores.shape[-1]).to(scores.dtype)
    return torch.stack(rows, 1)


def test_topk_forward_is_hard_and_sorted():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 9, generator=g, requires_grad=True)
    W = differentiable_topk(scores, 4, 0.02)
    idx = scores.detach().sort(-1, descending=True).indices[:, :4]
    assert torch.equal(W, F.one_hot(idx, 9).float())
    top = W.argmax(-1)
    picked = scores.detach().gather(1, top)
    assert (picked[:, :-1] > picked[:, 1:]).all()  # descending
    assert all(len(set(row)) == 4 for row in top.tolist())
    cand = torch.randn(3, 9, 5, generator=g)
    assert torch.equal(select(W, cand), cand[torch.arange(3)[:, None], idx])  # exactly the top-k documents


@pytest.mark.parametrize("temperature", [0.02, 0.3, 2.0])
def test_topk_gradient_matches_soft_formula(temperature: float):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 7, generator=g).double()
    cand = torch.randn(2, 7, 4, generator=g).double()
    target = torch.randn(2, 3, 4, generator=g).double()

    scores = base.clone().requires_grad_()
    (select(differentiable_topk(scores, 3, temperature), cand) * target).sum().backward()
    ref = base.clone().requires_grad_()
    (torch.einsum("bkn,bnd->bkd", soft_rows(ref, 3, temperature), cand) * target).sum().backward()

    assert scores.grad.abs().sum() > 0
    assert torch.allclose(scores.grad, ref.grad, atol=1e-6, rtol=0)


def test_temperature_sharpens_gradient():
    g = torch.Generator().manual_seed(3)
    n, k = 20, 3
    base = torch.randn(1, n, generator=g)
    cand = torch.randn(1, n, 6, generator=g)
    target = torch.randn(1, k, 6, generator=g)
    order = base.argsort(-1, descending=True)[0]

    def top_share(temperature: float) -> float:
        scores = base.clone().requires_grad_()
        (select(differentiable_topk(scores, k, temperature), cand) * target).sum().backward()
        mass = scores.grad[0].abs()
        return (mass[order[: k + 2]].sum() / mass.sum()).item()

    sharp, flat = top_share(0.05), top_share(10.0)
    assert sharp > 0.9 > 0.5 > flat  # low T: gradient on the few leading candidates; high T: spread out


@pytest.mark.parametrize("scores", [
    torch.zeros(2, 6),
    torch.tensor([[1.0, 1.0, 1.0, -1e30, -1e30, 0.5], [0.0, -float("inf"), -float("inf"), 0.0, 2.0, -1e38]]),
    torch.tensor([[-float("inf")] * 4 + [0.1, 0.2]] * 2),
    torch.tensor([[-float("inf")] * 6, [torch.finfo(torch.float32).min] * 6]),  # / T overflows to -inf
])
def test_topk_no_nan(scores: torch.Tensor):
    scores = scores.clone().requires_grad_()
    k = 5
    W = differentiable_topk(scores, k, 0.02)
    top = W.argmax(-1)
    assert torch.isfinite(W).all()
    assert torch.equal(W, F.one_hot(top, 6).float())
    assert all(len(set(row)) == k for row in top.tolist())
    (select(W, torch.randn(2, 6, 3)) * torch.randn(2, k, 3)).sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_recall_at_k():
    top_idx = torch.tensor([[0, 3, 5], [1, 2, 4], [7, 8, 9]])
    gold = [[3, 4], [1, 2], []]  # 1/2, 2/2; the example without gold is left out
    assert recall_at_k(top_idx, gold) == pytest.approx(0.75)
    assert recall_at_k(top_idx[:1], [[9]]) == 0.0
    assert recall_at_k(top_idx[:1], [[]]) == 0.0


def test_answer_loss_is_token_mean():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = -100
    labels[1, :2] = -100
    labels[1, 5] = -100
    shift = labels[:, 1:]
    n = int((shift != -100).sum())
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), shift.reshape(-1), ignore_index=-100)
    assert torch.allclose(answer_loss(logits, labels, torch.tensor(n)), expected, atol=1e-6)
    assert torch.allclose(answer_loss(logits.bfloat16(), labels, n), answer_loss(logits.bfloat16().float(), labels, n))
    # num_items is a divisor, as in crb's causal_lm (the whole step's target count)
    assert torch.allclose(answer_loss(logits, labels, 2 * n), expected / 2, atol=1e-6)


@pytest.mark.parametrize("gold", [0, 6])  # selected (highest score) or not (lowest)
def test_topk_gradient_raises_the_document_that_lowers_the_loss(gold: int):
    """A loss that is lower when the gold candidate fills a slot: descent raises the gold's score and lowers the
    others', whether the gold is among the top-k or not (the sign stage 3's query reasoner learns from)."""
    scores = torch.linspace(1.0, 0.0, 7).unsqueeze(0).requires_grad_()
    cand = torch.eye(7).unsqueeze(0)  # candidate n: the n-th unit vector
    loss = -select(differentiable_topk(scores, 3, 0.5), cand)[..., gold].sum()
    loss.backward()
    assert scores.grad[0, gold] < 0
    assert (scores.grad[0, torch.arange(7) != gold] > 0).all()
