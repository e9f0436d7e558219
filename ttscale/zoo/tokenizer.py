"""Character-level tokenizer and chat template shared by the embedded models.

Vocabulary: ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3), then
``\\n``, ``\\t`` and the printable ASCII characters.  Every character is one
token (digits are single tokens); any other character becomes ``<unk>``.

The tokenizer adds no special tokens by itself (no post-processor): the chat
template writes ``<s>`` at the start of the conversation, so the rendered
text tokenizes identically whether the caller asks for special tokens or not
and BOS never appears twice.

Rendered conversation (``format_prompt``)::

    <s>Q: {problem}\\nA:

and with the assistant's answer (training text, verifier input)::

    <s>Q: {problem}\\nA: {solution}</s>\\n
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsInt

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
VOCAB: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)
VOCAB_SIZE = len(VOCAB)
MODEL_MAX_LENGTH = 2048

# Simple Jinja: no filters or tests beyond what every chat-template renderer supports.
CHAT_TEMPLATE = (
    "{{ '<s>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'Q: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'A: ' + message['content'] + '</s>' + '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Pure-Python rendering identical to :data:`CHAT_TEMPLATE`."""
    out = [BOS]
    for m in messages:
        if m["role"] == "user":
            out.append("Q: " + m["content"] + "\n")
        elif m["role"] == "assistant":
            out.append("A: " + m["content"] + EOS + "\n")
        else:
            out.append(m["content"] + "\n")
    if add_generation_prompt:
        out.append("A: ")
    return "".join(out)


def format_prompt(problem: str) -> str:
    """The chat template applied to one user turn, with the generation prompt."""
    return render([{"role": "user", "content": problem}], add_generation_prompt=True)


def format_scored(problem: str, solution: str) -> str:
    """Verifier input: user problem + assistant solution, no generation prompt."""
    return render([{"role": "user", "content": problem}, {"role": "assistant", "content": solution}])


def encode(text: str) -> list[int]:
    """Fast encoder equal to the ``tokenizers`` one (special tokens matched first)."""
    ids: list[int] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == "<":
            for tok in (BOS, EOS, PAD, UNK):
                if text.startswith(tok, i):
                    ids.append(VOCAB[tok])
                    i += len(tok)
                    break
            else:
                ids.append(VOCAB["<"])
                i += 1
            continue
        ids.append(VOCAB.get(text[i], UNK_ID))
        i += 1
    return ids


_INV = {i: t for t, i in VOCAB.items()}


def decode(ids: Iterable[SupportsInt], skip_special_tokens: bool = True) -> str:
    out: list[str] = []
    for i in ids:
        t = _INV.get(int(i), UNK)
        if skip_special_tokens and t in SPECIAL_TOKENS:
            continue
        out.append(t)
    return "".join(out)


def build_tokenizer() -> Tokenizer:
    """A ``tokenizers.Tokenizer`` (WordLevel over single characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tokenizer_config() -> dict[str, Any]:
    added = {
        str(VOCAB[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(directory: str | os.PathLike[str]) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2) + "\n"
    )
    stale = d / "chat_template.jinja"  # would take precedence over tokenizer_config.json
    if stale.exists():
        stale.unlink()


def load_hf_tokenizer(directory: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """``transformers`` tokenizer from ``directory`` (or built in memory)."""
    from transformers import PreTrainedTokenizerFast

    if directory is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    cfg = tokenizer_config()
    t = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    t.chat_template = cfg["chat_template"]
    return t
