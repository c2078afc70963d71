"""CLaRa: one causal LM base with three LoRA adapters, `encoder` (compresses each document into
n memory embeddings), `decoder` (answers from them) and `query_reasoner` (stage 3: encodes the
question to score candidate documents). docs/clara.md describes the method.

The active adapter is switched per sub-forward by setting each LoRA layer's active adapter
directly (PEFT's set_adapter would also flip requires_grad); every adapter of the stage trains.
Under gradient checkpointing, a layer's recomputation in backward runs under the adapter that was
active in its forward (`recompute_context`, torch.utils.checkpoint's context_fn).
Added tokens: <MEM0>..<MEM{n-1}>, <AE>, <ENC>, <SEP>. Only the memory rows train: they live in a
small fp32 embedding (`memory`) that a forward hook writes over the frozen embedding's output at
the memory tokens, so the optimizer updates fp32 weights (a bf16 row would round away updates
of 5e-6) and the vocabulary's other rows take no gradient."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from crb.losses.clara import clara_mse, differentiable_topk, recall_at_k, select
from crb.units import IGNORE

ADAPTERS = ("encoder", "decoder", "query_reasoner")


def special_tokens(n_mem: int) -> list[str]:
    return [f"<MEM{i}>" for i in range(n_mem)] + ["<AE>", "<ENC>", "<SEP>"]


@dataclass
class ClaraOutput:
    generation: torch.Tensor  # answer CE, summed over answer tokens / num_items
    mse: torch.Tensor  # clara_mse of the compressed documents (0 in stage 3: no gradient there)
    recall: float | None = None  # stage 3: recall@k of the gold documents among the selected


class Clara(torch.nn.Module):
    def __init__(self, peft_model: torch.nn.Module, mem_ids: list[int], added_ids: list[int],
                 adapters: tuple[str, ...], top_k: int, temperature: float) -> None:
        super().__init__()
        self.peft = peft_model
        self.adapters = adapters
        self.top_k, self.temperature = top_k, temperature
        self.register_buffer("mem_ids", torch.tensor(mem_ids), persistent=False)
        self.added_ids = torch.tensor(added_ids)  # every token crb added (memory, <AE>, <ENC>, <SEP>): saved rows
        self.config = peft_model.config
        self.lora_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]  # what use() sets
        self.active = adapters[0]
        embed = self.embeddings()
        embed.weight.requires_grad_(False)
        self.memory = torch.nn.Embedding.from_pretrained(embed.weight[mem_ids].detach().float(), freeze=False)
        embed.register_forward_hook(self._memory_rows)

    def _memory_rows(self, _module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The input embedding's output with the memory tokens' vectors taken from the fp32 `memory` rows."""
        ids = args[0]
        is_mem = ids.unsqueeze(-1) == self.mem_ids  # (..., n_mem): which memory token, if any
        at = is_mem.any(-1)
        rows = self.memory(is_mem[at].int().argmax(-1))
        return out.masked_scatter(at.unsqueeze(-1), rows.to(out.dtype))

    def embeddings(self) -> torch.nn.Embedding:
        return self.peft.get_input_embeddings()

    def use(self, name: str) -> None:
        """Route every LoRA layer through adapter `name` (requires_grad untouched)."""
        self.active = name
        for module in self.lora_layers:
            module._active_adapter = name

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Adapter `name` inside the block, the active one again after it."""
        before = self.active
        self.use(name)
        try:
            yield
        finally:
            self.use(before)

    def recompute_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint's context_fn (non-reentrant), called in a checkpointed layer's forward: nothing
        around the forward; the recomputation in backward runs under the adapter active now."""
        return contextlib.nullcontext(), self.using(self.active)

    def backbone_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (after the final norm), without the LM head."""
        inner = self.peft.get_base_model().model
        return inner(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def compress(self, ids: torch.Tensor, mask: torch.Tensor, adapter: str = "encoder"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(documents, n_mem, hidden) memory embeddings, and the MSE between memory and text means."""
        self.use(adapter)
        hidden = self.backbone_hidden(ids, mask)
        mem = torch.isin(ids, self.mem_ids)
        n = int(mem[0].sum())
        return hidden[mem].view(ids.shape[0], n, -1), clara_mse(hidden, mask, mem)

    def decoder_embeds(self, ids: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings of `ids`, its memory slots replaced by `docs` (batch, slots, hidden)."""
        emb = self.embeddings()(ids)
        slots = torch.isin(ids, self.mem_ids).unsqueeze(-1)
        return emb.masked_scatter(slots, docs.to(emb.dtype).reshape(-1))

    def generate_loss(self, batch: dict, docs: torch.Tensor, num_items: torch.Tensor) -> torch.Tensor:
        """Decoder forward on the prompt with the compressed documents in its memory slots; answer CE."""
        self.use("decoder")
        emb = self.decoder_embeds(batch["dec_ids"], docs)
        logits = self.peft(inputs_embeds=emb, attention_mask=batch["dec_mask"], use_cache=False).logits
        labels = batch["dec_labels"]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                               reduction="sum")
        return loss / num_items

    def retrieve(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3: (cosine scores of the question against each candidate (b, candidates), the candidates'
        memory embeddings (b, candidates, n_mem, hidden)). Candidates compress without grad, the question
        through the query reasoner with grad."""
        b = batch["dec_ids"].shape[0]
        with torch.no_grad():
            cands, _ = self.compress(batch["doc_ids"], batch["doc_mask"])
        query, _ = self.compress(batch["query_ids"], batch["query_mask"], "query_reasoner")
        cands = cands.reshape(b, -1, *cands.shape[1:])
        scores = torch.einsum("bd,bkd->bk", F.normalize(query.reshape(b, -1).float(), dim=-1),
                              F.normalize(cands.flatten(2).float(), dim=-1))
        return scores, cands

    def forward(self, batch: dict, num_items: torch.Tensor) -> ClaraOutput:
        b = batch["dec_ids"].shape[0]
        if "query_reasoner" not in self.adapters:  # stages 1-2: the given documents, compressed with grad
            docs, mse = self.compress(batch["doc_ids"], batch["doc_mask"])
            return ClaraOutput(self.generate_loss(batch, docs.reshape(b, -1, docs.shape[-1]), num_items), mse)
        scores, cands = self.retrieve(batch)
        weights = differentiable_topk(scores, self.top_k, self.temperature)  # (b, top_k, candidates)
        recall = recall_at_k(weights.detach().argmax(-1), batch["gold"])
        docs = select(weights, cands.flatten(2).float()).reshape(b, -1, cands.shape[-1])  # forward: the top-k exactly
        return ClaraOutput(self.generate_loss(batch, docs, num_items), torch.zeros((), device=scores.device), recall)

    @torch.no_grad()
    def answer(self, doc_ids: torch.Tensor, doc_mask: torch.Tensor, prompt_ids: torch.Tensor,
               **generate: object) -> torch.Tensor:
        """Generated ids for one prompt (1, length) whose memory slots take the given documents, compressed."""
        docs, _ = self.compress(doc_ids, doc_mask)
        self.use("decoder")
        emb = self.decoder_embeds(prompt_ids, docs.reshape(1, -1, docs.shape[-1]))
        return self.peft.generate(inputs_embeds=emb, attention_mask=torch.ones_like(prompt_ids), **generate)

    def save(self, folder: str | Path) -> None:
        """PEFT folders per adapter (folder/encoder, folder/decoder, ...), the added tokens' embedding rows
        (the memory rows in fp32) and clara.json (what a later stage or `crb verify` needs)."""
        folder = Path(folder)
        self.peft.save_pretrained(folder, selected_adapters=list(self.adapters),
                                  save_embedding_layers=False)  # the added rows go to clara_embeddings
        rows = self.embeddings().weight.detach()[self.added_ids].float().cpu()
        rows[torch.isin(self.added_ids, self.mem_ids.cpu())] = self.memory.weight.detach().float().cpu()  # in order
        save_file({"ids": self.added_ids.contiguous(), "rows": rows.contiguous()},
                  folder / "clara_embeddings.safetensors")
        (folder / "clara.json").write_text(json.dumps({"adapters": list(self.adapters), "top_k": self.top_k,
                                                       "n_mem": len(self.mem_ids), "temperature": self.temperature}))

    @torch.no_grad()
    def load_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """A saved stage's added-token rows (`save`): into the embedding, and the memory rows at full precision."""
        weight = self.embeddings().weight
        weight[ids.to(weight.device)] = rows.to(weight.device, weight.dtype)
        for i, token in enumerate(self.mem_ids.tolist()):
            self.memory.weight[i] = rows[ids.tolist().index(token)].to(self.memory.weight.device)
