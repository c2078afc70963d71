"""The translation agent (data.format "translation"): a seq2seq model (NLLB-200) on `source_lang, target_lang,
source_text, target_text` records in the recipe's directions; BLEU and chrF (sacrebleu) on generated
translations, the target language forced as the first token."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from crb.data import Row, translation
from crb.data.collate import Batcher, seq2seq_batcher
from crb.data.reader import Record
from crb.errors import CrbError
from crb.losses.seq2seq import seq2seq
from crb.recipe.schema import ClaraConfig, DataConfig, Recipe
from crb.tasks.base import Loader, Metric, Task, strings


class Translation(Task):
    format = "translation"
    kind = "seq2seq"
    auto_class = AutoModelForSeq2SeqLM
    losses = {"seq2seq": seq2seq}
    default_losses = ("seq2seq",)
    demo_prompt, demo_target = "Do you have this shirt in size medium?", "fra_Latn"
    fields = frozenset({"source_lang", "target_lang", "source_text", "target_text"})
    keys = ("data.languages", "data.source_lang", "data.target_langs", "eval.max_new_tokens", "eval.num_beams")
    offloadable = True
    kernels = "cce"  # liger's chunked loss is slower than the plain logits at NLLB's 256k vocabulary
    compile = "graphs"  # its step is bound by kernel launches: CUDA graphs 1.54x eager (H200)
    token_keys = ("input_ids", "labels")

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> dict[str, str]:
        return translation.check_pair(rec.data, rec.where(), cfg)

    def trains(self, checked: dict[str, str], cfg: DataConfig) -> bool:
        return translation.in_directions(checked, cfg)

    def make_row(self, checked: dict[str, str], where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                 template: str, clara_cfg: ClaraConfig | None) -> tuple[Row, int] | None:
        translation.check_language_tokens(checked, where, tokenizer)
        if not self.trains(checked, cfg):
            return None
        row = translation.tokenize_pair(checked, tokenizer)
        return row, max(len(row["input_ids"]), len(row["labels"]))

    def truncate(self, item: Row, max_length: int) -> Row:
        return translation.truncate(item, max_length)

    def texts(self, record: dict) -> dict[str, list[str]]:
        return {k: strings(record.get(k)) for k in ("source_text", "target_text") if k in record}

    def describe(self, records: list[dict]) -> dict[str, dict]:
        pairs = Counter(f"{d.get('source_lang')} -> {d.get('target_lang')}" for d in records)
        return {"language_pairs": dict(pairs.most_common())} if pairs else {}

    def batcher(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> Batcher:
        multiple = 64 if recipe.train.compile == "graphs" else 1  # few shapes, few recorded CUDA graphs
        return seq2seq_batcher(tokenizer.pad_token_id, model.config.decoder_start_token_id, multiple)

    def plan_tokens(self, recipe: Recipe, micro_batch: int, length: int) -> tuple[int, int, int]:
        n = micro_batch * length  # encoder and decoder stacks, logits on the target
        return 2 * n, n, n

    def metrics(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[Row], all_rows: list[Row]
                ) -> list[Metric]:
        return [lambda model: translation_scores(model, tokenizer, rows, recipe)]

    def verify(self, load: Loader, recipe: dict, prompt: str, max_new_tokens: int, target_lang: str | None = None,
               source_lang: str | None = None, docs: list[str] | None = None) -> str:
        """`prompt` translated into `target_lang` (from `source_lang`: the recipe's, else English)."""
        data = recipe["data"]
        source_lang = source_lang or data.get("source_lang") or "eng_Latn"
        if not target_lang:
            raise CrbError("verify: translation results need --target-lang CODE (e.g. hin_Deva)")
        for flag, code in (("--source-lang", source_lang), ("--target-lang", target_lang)):
            if code not in data["languages"]:
                raise CrbError(f"verify: {flag} {code}: not in the recipe's data.languages")
        model, tokenizer = load()
        tokenizer.src_lang = source_lang
        ids = tokenizer(prompt)["input_ids"]
        return translate(model, tokenizer, [np.asarray(ids)], tokenizer.convert_tokens_to_ids(target_lang),
                         max_new_tokens, 1, 1)[0]


def translate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sources: list[np.ndarray],
              target_lang_id: int, max_new_tokens: int, num_beams: int, batch_size: int) -> list[str]:
    """Generate translations of tokenized sources, the target language forced as the first token."""
    out: list[str] = []
    device = next(model.parameters()).device
    for i in range(0, len(sources), batch_size):
        chunk = sources[i: i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):  # left-aligned, as in training
            ids[j, : len(s)], mask[j, : len(s)] = torch.from_numpy(s), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             forced_bos_token_id=target_lang_id, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             do_sample=False)
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return out


def translation_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list, recipe: Recipe) -> dict:
    import sacrebleu

    e = recipe.eval
    hyps, refs = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lang in sorted({int(r["target_lang"][0]) for r in rows}):
            group = [r for r in rows if int(r["target_lang"][0]) == lang]
            hyps += translate(model, tokenizer, [r["input_ids"] for r in group], lang, e.max_new_tokens, e.num_beams,
                              e.batch_size)
            refs += [str(r["target_text"][0]) for r in group]
    model.train(was_training)
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}


TASK = Translation()
