"""Embedded models: resolution by name/path and loading through transformers."""

import json
import math

import pytest

from ttscale.errors import ModelNotFoundError
from ttscale.models import EMBEDDED_MODELS, MODELS_DIR, resolve_model
from ttscale.zoo import tasks
from ttscale.zoo import tokenizer as T


def test_resolve_by_name_and_path(tmp_path):
    for name in EMBEDDED_MODELS:
        p = resolve_model(name)
        assert p == MODELS_DIR / name and (p / "config.json").is_file()
        assert resolve_model(str(p)) == p.resolve()
    with pytest.raises(ModelNotFoundError):
        resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path))  # a directory without config.json
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path / "missing"))


def test_package_files_and_size():
    total = 0
    for name in EMBEDDED_MODELS:
        d = MODELS_DIR / name
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "README.md",
        ):
            assert (d / f).is_file(), (name, f)
        assert not (d / "chat_template.jinja").exists()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["chat_template"] == T.CHAT_TEMPLATE
        assert (d / "tokenizer.json").read_text() == (MODELS_DIR / EMBEDDED_MODELS[0] / "tokenizer.json").read_text()
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total <= 25 * 1024 * 1024


def _params(name):
    from safetensors import safe_open

    with safe_open(str(MODELS_DIR / name / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safetensors' safe_open is not iterable)


def test_draft_is_at_least_three_times_smaller():
    assert _params("ttscale-arith") >= 3 * _params("ttscale-arith-draft")


@pytest.fixture(scope="module")
def level1():
    return tasks.eval_set(per_level=5)[:5]


@pytest.mark.parametrize("name", ["ttscale-arith", "ttscale-arith-draft"])
def test_transformers_generate_boxed(name, level1):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    answers = []
    for r in level1:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": r["problem"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        assert ids["input_ids"][0].tolist() == T.encode(T.format_prompt(r["problem"]))
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=64)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(tasks.extract_answer(text))
        assert tasks.extract_answer(text) is not None, text
    if name == "ttscale-arith":
        assert sum(a == int(r["answer"]) for a, r in zip(answers, level1)) >= 3


def test_transformers_verifier_one_logit(level1):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("ttscale-arith-verifier")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == T.PAD_ID
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}], tokenize=False
        )
        for r in level1
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (len(texts), 1)
    assert torch.isfinite(logits).all()
    # padding must not change a score
    single = tok(texts[:1], return_tensors="pt")
    with torch.no_grad():
        one = model(**single).logits
    assert torch.allclose(one[0], logits[0], atol=1e-3)
