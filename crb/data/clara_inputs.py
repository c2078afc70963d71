"""CLaRa token layouts (docs/clara.md): a document for compression is
`<ENC> BOS text EOS`, cut or padded to doc_max_length + 3, then the n memory tokens (attended);
the decoder prompt renders with the chat template: a system prompt, a user turn "Background:\\n"
+ top_k slots of (<MEM0>..<MEM{n-1}> <SEP>) + the question (where the stage has one) or, for a
stage-1 paraphrase record, the instruction to restate the background, and the assistant turn as
the target; labels cover the assistant answer only."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data.chatml import render, tokenize_chat

SYSTEM = "You are a helpful assistant. Answer the question using the compressed background documents."
PARAPHRASE = "Restate the background above in your own words."  # stage 1's paraphrase records


def document_ids(text: str, tokenizer: PreTrainedTokenizerBase, doc_max_length: int, n_mem: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of one document as the encoder sees it."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"][:doc_max_length]
    enc = tokenizer.convert_tokens_to_ids("<ENC>")
    ids = [enc, tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    pad = doc_max_length + 3 - len(ids)
    mem = tokenizer.convert_tokens_to_ids([f"<MEM{i}>" for i in range(n_mem)])
    all_ids = ids + [tokenizer.pad_token_id] * pad + mem
    mask = [1] * len(ids) + [0] * pad + [1] * n_mem
    return np.asarray(all_ids, np.int64), np.asarray(mask, np.int64)


def _user_turn(question: str | None, slots: int, n_mem: int, instruction: str | None = None) -> str:
    slot = "".join(f"<MEM{i}>" for i in range(n_mem)) + "<SEP>"
    return ("Background:\n" + slot * slots + (f"\nQuestion: {question}" if question else "")
            + (f"\n{instruction}" if instruction else ""))


def decoder_prompt_ids(question: str, slots: int, n_mem: int, tokenizer: PreTrainedTokenizerBase,
                       template: str) -> np.ndarray:
    """The decoder prompt up to the assistant's answer, for generation."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _user_turn(question, slots, n_mem)}]
    text = render(messages, tokenizer, template, add_generation_prompt=True)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)


def decoder_ids(question: str | None, answer: str, slots: int, n_mem: int, tokenizer: PreTrainedTokenizerBase,
                template: str, where: str, instruction: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of the decoder prompt with `slots` memory slots (and `instruction` after them) and the
    answer as target."""
    user = _user_turn(question, slots, n_mem, instruction)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]
    ids, labels = tokenize_chat(messages, tokenizer, template, where)
    return np.asarray(ids, np.int64), np.asarray(labels, np.int64)
