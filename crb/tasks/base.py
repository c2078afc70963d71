"""The Task interface: all that one agent is, keyed by its `data.format`. One subclass per agent
(crb/tasks/<agent>.py), one instance of it in crb.tasks.TASKS.

The attributes say what the recipe checks, the data preparation, the engine and the planner need to know of
the agent; the methods do its own work, wiring the readers (crb/data/), batchers (crb/data/collate.py), losses
(crb/losses/) and models (crb/models/) it is made of. The methods that raise NotImplementedError here are the
ones every agent writes; the others have the plain default."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from crb.data import Row
from crb.data.collate import Batcher
from crb.data.packing import Doc
from crb.data.reader import Record
from crb.recipe.schema import OFFLOAD_NEEDS, Bad, ClaraConfig, DataConfig, Recipe

Metric = Callable[[torch.nn.Module], dict[str, float]]  # the model being trained -> {name: value}
Loader = Callable[[], tuple[torch.nn.Module, PreTrainedTokenizerBase]]  # a run's trained model and tokenizer


class Task:
    """One agent: what the layers above need to know of it (attributes) and its own work (methods)."""

    format: str  # the recipe's data.format
    kind: str  # the model family the engine builds and loads: causal, seq2seq, embedding or clara
    auto_class: type | None  # transformers' Auto class of its (base) model; None: a sentence-transformers encoder
    losses: Mapping[str, Callable]  # the losses that fit its batches, by the name [[losses]] gives (crb/losses/)
    default_losses: tuple[str, ...]  # those a recipe without [[losses]] trains with (weight 1 each)
    fields: frozenset[str]  # its record fields (what data.columns may map a source's columns to)
    keys: tuple[str, ...] = ()  # recipe keys and tables only this agent reads (set with another format: refused)
    packable: bool = False  # rows are token documents that data.packing packs (and FlexAttention separates on CUDA)
    label_shift: int = 0  # 1: the labels are the input ids, which a causal LM predicts one token ahead
    whole_batch: bool = False  # its loss needs the whole batch in one pass (in-batch negatives): never accumulated
    offloadable: bool = False  # its checkpointed layer inputs can go to CPU memory (train.offload_activations)
    kernels: str = "none"  # the fused loss train.kernels = "auto" takes on CUDA: liger, cce, none (none fits)
    compile: bool | str = False  # what train.compile = "auto" takes on CUDA: True, "graphs" (measured faster there)
    chat: bool = False  # its tokenizer renders chats (data.chat_template, saved with the result)
    trains_embedding_rows: bool = False  # some embedding rows train (CLaRa's memory tokens): no weight decay, planned
    demo_prompt: str = ""  # what `crb demo` asks the trained result, on the shipped retail demo data
    demo_target: str | None = None  # and into which language (translation)
    token_keys: tuple[str, ...] = ("input_ids",)  # the row keys whose length is one pass's tokens; (): rows of texts

    @property
    def allowed_losses(self) -> tuple[str, ...]:
        return tuple(self.losses)

    # ---------------------------------------------------------------- recipe

    def check_recipe(self, recipe: Recipe, bad: Bad) -> None:
        """Raise bad(key, why, value) for a recipe key this agent cannot honour (crb.recipe.schema.load)."""
        if recipe.data.packing and not self.packable:
            raise bad("data.packing", f"expected false for {self.format} data (packing is for causal LM rows)", True)
        if recipe.train.offload_activations is True and not self.offloadable:
            raise bad("train.offload_activations", OFFLOAD_NEEDS, True)

    # ---------------------------------------------------------------- data (crb.data.prepare and validate)

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> Any:
        """The record's fields in its format's shape, or a DataError naming the record and the field at fault. No
        tokenizer: what needs one (token counts, language tokens) comes in make_row."""
        raise NotImplementedError

    def trains(self, checked: Any, cfg: DataConfig) -> bool:
        """Whether the recipe trains on this checked record (translation: its direction)."""
        return True

    def make_row(self, checked: Any, where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
                 clara_cfg: ClaraConfig | None) -> tuple[Row | Doc, int] | None:
        """A checked record as a row (or a Doc that packing makes rows of) and its length in tokens; None: a record
        the recipe does not train."""
        raise NotImplementedError

    def truncate(self, item: Row | Doc, max_length: int) -> Row | Doc:
        """A row cut to data.max_length."""
        raise NotImplementedError

    def labels(self, item: Row | Doc) -> Any:
        """The item's labels (a row left with none to learn from is dropped), or None: it always has a target."""
        return None

    def check_row(self, row: Row, where: str, seen: dict, clara_cfg: ClaraConfig | None) -> None:
        """A DataError for a row at odds with the rows read before it (`seen`: what this read remembers). Runs in
        file order once the records are tokenized, on rows that are not packable documents."""

    # ---------------------------------------------------------------- data checks (crb data inspect | check | clean)

    def texts(self, record: dict) -> dict[str, list[str]]:
        """The text fields of a raw record, by field name."""
        raise NotImplementedError

    def problems(self, record: dict) -> list[str]:
        """What `crb data check` finds wrong with a raw record beyond its texts (errors)."""
        return []

    def describe(self, records: list[dict]) -> dict[str, dict]:
        """What `crb data inspect` counts of the usable raw records beyond their lengths: {group: {key: value}}."""
        return {}

    # ---------------------------------------------------------------- model and batches

    def special_tokens(self, recipe: Recipe) -> list[str]:
        """Tokens the tokenizer gains for this agent."""
        return []

    def encoder(self, name: str, **kwargs: Any) -> torch.nn.Module:
        """An embedding agent's sentence-transformers model, from a hub id or folder: the base to train (crb's build)
        or a run's final_model/ (crb verify); `kwargs`: the library's own (device, revision, model_kwargs, ...)."""
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(name, **kwargs)

    def batcher(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> Batcher:
        """How rows become batches, and what a batch counts."""
        raise NotImplementedError

    # ---------------------------------------------------------------- plan

    def plan_tokens(self, recipe: Recipe, micro_batch: int, length: int) -> tuple[int, int, int]:
        """For crb plan, per micro-batch of rows of `length` tokens: (tokens through the layers, positions whose
        vocabulary logits are computed, the most tokens in one pass of one layer stack)."""
        tokens = micro_batch * length
        return tokens, tokens, tokens

    def lora_adapters(self, recipe: Recipe) -> int:
        """The LoRA adapter sets on the base model."""
        return 1

    # ---------------------------------------------------------------- eval and result

    def metrics(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[Row], all_rows: list[Row]
                ) -> list[Metric]:
        """Metrics beside the eval loss, on the held-out `rows` (cut to eval.max_samples); `all_rows`: train and
        eval."""
        return []

    def verify(self, load: Loader, recipe: dict, prompt: str, max_new_tokens: int, target_lang: str | None = None,
               source_lang: str | None = None, docs: list[str] | None = None) -> str:
        """`crb verify`: the trained model's answer to `prompt`. `load()`: the model and its tokenizer (called once
        the options are checked); `recipe`: the run's resolved recipe."""
        raise NotImplementedError


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, max_new_tokens: int
             ) -> str:
    """Greedy continuation of `ids` (1 x n), up to the end of the text or of a ChatML turn."""
    stop = [tokenizer.eos_token_id]
    if "<|im_end|>" in tokenizer.get_vocab():  # a ChatML turn ends there
        stop.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    return tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


def strings(value: Any) -> list[str]:
    """The strings of a raw record's field: itself, or those in its list (crb data check reads them)."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
