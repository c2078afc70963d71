"""ChatML masking: labels are exactly the assistant turns (content + end-of-turn token)."""

from __future__ import annotations

import pytest

from crb.data.chatml import CHATML_TEMPLATE, check_messages, tokenize_chat
from crb.errors import DataError
from crb.units import IGNORE

MISTRAL_LIKE = (  # no {% generation %} markers; system folded into the first user turn; EOS ends a turn
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

MISTRAL_V03_LIKE = (  # as Mistral-7B-Instruct-v0.3's: the system message joins the user turn only when it is last
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else none %}{{ bos_token }}"
    "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
    "{% if loop.last and sys %}[INST] {{ sys }}\n\n{{ m['content'] }}[/INST]{% else %}[INST] {{ m['content'] }}[/INST]"
    "{% endif %}{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

CONVO = [
    {"role": "system", "content": "You are a helpful retail assistant."},
    {"role": "user", "content": "Do you have the navy suit in 40?"},
    {"role": "assistant", "content": "Yes, the navy suit is in stock in size 40."},
    {"role": "user", "content": "How much is it?"},
    {"role": "assistant", "content": "The navy suit costs 300 dollars."},
]


def labelled_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_chatml_labels_equal_transformers_assistant_mask(tiny_tokenizer):
    ids, labels = tokenize_chat(CONVO, tiny_tokenizer, CHATML_TEMPLATE)
    ref = tiny_tokenizer.apply_chat_template(CONVO, chat_template=CHATML_TEMPLATE, tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert [lab != IGNORE for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert sum(lab != IGNORE for lab in labels) > 10
    assert labels.count(IGNORE) > 10


def test_chatml_labels_are_the_assistant_turns_with_end_of_turn(tiny_tokenizer):
    ids, labels = tokenize_chat(CONVO, tiny_tokenizer, CHATML_TEMPLATE)
    text = labelled_text(tiny_tokenizer, ids, labels)
    assert text == ("Yes, the navy suit is in stock in size 40.<|im_end|>"
                    "The navy suit costs 300 dollars.<|im_end|>")
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))


def test_template_without_generation_markers(tiny_tokenizer):
    ids, labels = tokenize_chat(CONVO, tiny_tokenizer, MISTRAL_LIKE)
    assert ids[0] == tiny_tokenizer.bos_token_id
    text = labelled_text(tiny_tokenizer, ids, labels)
    assert text.strip() == "Yes, the navy suit is in stock in size 40.</s>The navy suit costs 300 dollars.</s>"
    assert "How much" not in text and "retail assistant" not in text


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, MISTRAL_LIKE, MISTRAL_V03_LIKE])
def test_an_answer_quoted_earlier_keeps_its_labels_on_the_assistant_turn(tiny_tokenizer, template):
    convo = [{"role": "system", "content": "Answer yes or no."},
             {"role": "user", "content": "Is the navy suit in stock, yes or no?"},
             {"role": "assistant", "content": "yes"},
             {"role": "user", "content": "Say yes again."},
             {"role": "assistant", "content": "yes"}]
    ids, labels = tokenize_chat(convo, tiny_tokenizer, template)
    text = labelled_text(tiny_tokenizer, ids, labels)
    assert text.replace("<|im_end|>", "|").replace("</s>", "|").replace(" ", "") == "yes|yes|"
    if template == CHATML_TEMPLATE:
        ref = tiny_tokenizer.apply_chat_template(convo, chat_template=template, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert [lab != IGNORE for lab in labels] == [bool(m) for m in ref["assistant_masks"]]


@pytest.mark.parametrize("messages, message", [
    ([], "messages: expected a non-empty list"),
    ([{"role": "user"}], "messages[0]: expected an object with 'role' and 'content'"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role: expected one of system, user, assistant, got 'robot'"),
    ([{"role": "user", "content": "  "}], "messages[0].content: expected non-empty text"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
])
def test_malformed_conversations(messages, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_messages(messages, "chat.jsonl:3")
