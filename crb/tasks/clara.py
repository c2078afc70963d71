"""The CLaRa agent (data.format "clara", docs/clara.md): crb's own model (crb.models.clara), three LoRA adapters
on one causal LM base that compress documents into memory tokens and answer from them; its stages (phases) read
stage-1 or stage-2/3 records (crb.data.clara). Stage 3 scores the recall@k of the gold documents among the
candidates its query reasoner selects."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from accelerate.utils import send_to_device
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from crb.data import Row
from crb.data import clara as clara_data
from crb.data.chatml import chat_template
from crb.data.clara_inputs import PARAPHRASE, decoder_ids, decoder_prompt_ids, document_ids
from crb.data.collate import Batcher, clara_batcher
from crb.data.reader import Record
from crb.errors import CrbError, DataError
from crb.losses.clara import clara_generation, clara_mse_loss, recall_at_k
from crb.recipe.schema import Bad, ClaraConfig, DataConfig, Recipe
from crb.tasks.base import Loader, Metric, Task, strings


class Clara(Task):
    format = "clara"
    kind = "clara"
    auto_class = AutoModelForCausalLM  # the base; crb.engine.build wraps it (crb.models.clara)
    losses = {"clara_generation": clara_generation, "clara_mse": clara_mse_loss}
    default_losses = ("clara_generation",)
    fields = frozenset({"data_type", "question", "answers", "docs", "answer", "pos_index"})
    keys = ("clara",)
    chat = True  # not compiled: not measured
    trains_embedding_rows = True  # the memory tokens' rows (fp32)
    token_keys = ("dec_ids",)  # the decoder prompt (the encoder's documents are clara.doc_width each)

    def check_recipe(self, recipe: Recipe, bad: Bad) -> None:
        super().check_recipe(recipe, bad)
        c = recipe.clara
        if recipe.method.name not in ("lora", "qlora"):
            raise bad("method.name", "expected 'lora' or 'qlora' for clara (three LoRA adapters on one base)",
                      recipe.method.name)
        if c.compress_rate <= 0 or c.doc_max_length % c.compress_rate:
            raise bad("clara.compress_rate", f"expected a divisor of clara.doc_max_length ({c.doc_max_length})",
                      c.compress_rate)
        if c.top_k <= 0 or not c.temperature > 0:
            raise bad("clara.top_k", "expected top_k > 0 and temperature > 0", (c.top_k, c.temperature))

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> dict:
        """The documents the stage reads, question, answer, gold indices and memory slots of a record."""
        data, where, c = rec.data, rec.where(), clara_cfg
        if c.phase == "compression":
            r = clara_data.check_stage1(data, where)
            return {"docs": [r["doc"]], "question": None, "answer": r["target"], "gold": [0], "slots": 1,
                    "instruction": PARAPHRASE if r["data_type"] == "paraphrase" else None}
        r = clara_data.check_stage23(data, where)
        if len(r["docs"]) < c.top_k:
            raise DataError(f"{where}: docs: expected at least clara.top_k ({c.top_k}) documents, got {len(r['docs'])}")
        docs, gold = r["docs"], r["pos_index"]
        if c.phase == "instruction":  # top_k of the candidates: the gold ones and others drawn, in record order
            keep = clara_data.instruction_docs(len(docs), gold, c.top_k, r["question"])
            docs, gold = [docs[i] for i in keep], [keep.index(g) for g in gold if g in keep]
        return {"docs": docs, "question": r["question"], "answer": r["answer"], "gold": gold, "slots": c.top_k,
                "instruction": None}

    def make_row(self, checked: dict, where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
                 clara_cfg: ClaraConfig | None) -> tuple[Row, int]:
        """Token ids: documents for the encoder (flattened), the decoder prompt and labels, and in stage 3 the
        question for the query reasoner and the gold documents."""
        c = clara_cfg
        n_mem = c.memory_tokens
        encoded = [document_ids(d, tokenizer, c.doc_max_length, n_mem) for d in checked["docs"]]
        dec_ids, dec_labels = decoder_ids(checked["question"], checked["answer"], checked["slots"], n_mem, tokenizer,
                                          template, where, checked["instruction"])
        row = {"doc_ids": np.concatenate([e[0] for e in encoded]),
               "doc_mask": np.concatenate([e[1] for e in encoded]),
               "dec_ids": dec_ids, "dec_labels": dec_labels, "gold": np.asarray(checked["gold"], np.int64)}
        if c.phase == "end_to_end":
            row["query_ids"], row["query_mask"] = document_ids(checked["question"], tokenizer, c.doc_max_length, n_mem)
        return row, len(row["dec_ids"])

    def truncate(self, item: Row, max_length: int) -> Row:
        return {**item, "dec_ids": item["dec_ids"][:max_length], "dec_labels": item["dec_labels"][:max_length]}

    def labels(self, item: Row) -> np.ndarray:
        return item["dec_labels"]

    def check_row(self, row: Row, where: str, seen: dict, clara_cfg: ClaraConfig | None) -> None:
        """Stage 3's rows stack their candidates: every record needs as many."""
        if clara_cfg.phase != "end_to_end":
            return
        n = len(row["doc_ids"]) // clara_cfg.doc_width
        first, at = seen.setdefault("candidates", (n, where))
        if n != first:
            raise DataError(f"{where}: docs: {n} candidate documents, {first} at {at}: stage 3 needs the same number "
                            "in every record (python -m crb.data.clara build-stages --docs N makes them so)")

    def texts(self, record: dict) -> dict[str, list[str]]:
        return {k: strings(record.get(k)) for k in ("docs", "question", "answers", "answer") if k in record}

    def describe(self, records: list[dict]) -> dict[str, dict]:
        counts = [f"docs {len(strings(d.get('docs')))}, questions {len(strings(d.get('question')))}" for d in records]
        return {"per_record": dict(Counter(counts).most_common())} if counts else {}

    def special_tokens(self, recipe: Recipe) -> list[str]:
        from crb.models.clara import special_tokens  # peft, on first use

        return special_tokens(recipe.clara.memory_tokens)

    def batcher(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> Batcher:
        return clara_batcher(tokenizer.pad_token_id, recipe.clara.doc_width)

    def plan_tokens(self, recipe: Recipe, micro_batch: int, length: int) -> tuple[int, int, int]:
        # the encoder passes that keep activations (stage 1: the document; 2: top_k documents; 3: the question, its
        # candidates compressed without grad), then the decoder prompt
        c, n = recipe.clara, micro_batch
        enc = n * (c.top_k if c.phase == "instruction" else 1) * c.doc_width
        return enc + n * length, n * length, max(enc, n * length)

    def lora_adapters(self, recipe: Recipe) -> int:
        return 3 if recipe.clara.phase == "end_to_end" else 2

    def metrics(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[Row], all_rows: list[Row]
                ) -> list[Metric]:
        if recipe.clara.phase != "end_to_end":
            return []
        collate, size = clara_batcher(tokenizer.pad_token_id, recipe.clara.doc_width), recipe.eval.batch_size
        return [lambda model: clara_recall(model, [collate.collate(rows[i: i + size])
                                                   for i in range(0, len(rows), size)])]

    def verify(self, load: Loader, recipe: dict, prompt: str, max_new_tokens: int, target_lang: str | None = None,
               source_lang: str | None = None, docs: list[str] | None = None) -> str:
        """The answer to the question `prompt` from `docs`, read through their compressed memory tokens."""
        if not docs:
            raise CrbError("verify: CLaRa results answer from documents: give them with --doc TEXT (repeatable)")
        model, tokenizer = load()
        c = ClaraConfig(**recipe["clara"])
        encoded = [document_ids(d, tokenizer, c.doc_max_length, c.memory_tokens) for d in docs]
        doc_ids = torch.tensor(np.stack([ids for ids, _ in encoded]))
        doc_mask = torch.tensor(np.stack([mask for _, mask in encoded]))
        template = chat_template(tokenizer, recipe["data"]["chat_template"])
        question = torch.tensor(decoder_prompt_ids(prompt, len(docs), c.memory_tokens, tokenizer, template))[None]
        stop = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids("<|im_end|>")]
                                           if "<|im_end|>" in tokenizer.get_vocab() else [])
        gen = model.answer(doc_ids, doc_mask, question, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        return tokenizer.decode(gen[0], skip_special_tokens=True).strip()


def clara_recall(model: torch.nn.Module, batches: list[dict]) -> dict:
    """CLaRa stage 3: recall@k (k = the model's top_k) of the gold documents among the k candidates the query
    reasoner scores highest, over the held-out questions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0.0
    with torch.no_grad():
        for batch in batches:
            scores, _ = model.retrieve(send_to_device(batch, device))
            top = scores.topk(model.top_k, dim=-1).indices
            n = sum(1 for g in batch["gold"] if g)
            hits, total = hits + recall_at_k(top, batch["gold"]) * n, total + n
    model.train(was_training)
    return {f"recall@{model.top_k}": hits / max(total, 1)}


TASK = Clara()
