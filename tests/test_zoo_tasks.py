"""Task generator, evaluation set and tokenizer of the embedded model zoo."""

import itertools
import json
from pathlib import Path

import pytest

from ttscale.zoo import tasks
from ttscale.zoo import tokenizer as T

ROOT = Path(__file__).resolve().parents[1]
ARITH500 = ROOT / "eval" / "datasets" / "arith500.jsonl"


def load_arith500():
    return [json.loads(x) for x in ARITH500.read_text().splitlines() if x.strip()]


def test_generate_is_deterministic_and_seed_dependent():
    a = tasks.generate(20, 3, seed=5)
    assert a == tasks.generate(20, 3, seed=5)
    assert a != tasks.generate(20, 3, seed=6)


@pytest.mark.parametrize("level", tasks.LEVELS)
def test_levels_and_worked_solutions(level):
    recs = tasks.generate(200, level, seed=1)
    assert all(r["level"] == level and r["source"] == tasks.SOURCE for r in recs)
    for r in recs:
        assert set(r) == {"id", "problem", "answer", "solution", "level", "source"}
        assert tasks.check_solution(r), r
        assert tasks.extract_answer(r["solution"]) == int(r["answer"])
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}")
        n_steps = len(r["solution"].split("\n")) - 1
        assert n_steps >= tasks.SPECS[level].n_ops


def test_difficulty_grows_with_level():
    mean_steps = [
        sum(len(r["solution"].split("\n")) for r in tasks.generate(100, L, seed=2)) / 100 for L in tasks.LEVELS
    ]
    assert mean_steps == sorted(mean_steps)
    mean_len = [sum(len(r["answer"]) for r in tasks.generate(100, L, seed=2)) / 100 for L in tasks.LEVELS]
    assert mean_len[-1] > mean_len[0]


def test_arith500_is_committed_and_reproducible():
    recs = load_arith500()
    assert len(recs) == 500
    assert [sum(r["level"] == L for r in recs) for L in tasks.LEVELS] == [100] * 5
    assert recs == tasks.eval_set()
    assert len({r["id"] for r in recs}) == 500
    assert all(tasks.check_solution(r) for r in recs)


def test_training_stream_never_yields_eval_problems():
    ev = {tasks.signature(r["problem"]) for r in load_arith500()}
    assert ev == set(tasks.eval_signatures())
    stream = tasks.training_stream(seed=0)
    train = [next(stream) for _ in range(20000)]
    assert not ({tasks.signature(r["problem"]) for r in train} & ev)
    assert not ({r["problem"] for r in train} & {r["problem"] for r in load_arith500()})
    # the exclusion is what keeps them apart: plain generation with the eval seed collides
    with pytest.raises(ValueError):
        next(tasks.training_stream(seed=tasks.EVAL_SEED))


def test_signature_ignores_names_and_items():
    assert tasks.signature("Ava has 3 pens. She gets 4 more.") == tasks.signature("Tom has 3 cups. He gets 4 more.")
    assert tasks.signature("Ava has 3 pens.") != tasks.signature("Ava has 4 pens.")


def test_extract_answer():
    assert tasks.extract_answer("1 + 1 = 2\n\\boxed{2}") == 2
    assert tasks.extract_answer("\\boxed{1} then \\boxed{-7}") == -7
    assert tasks.extract_answer("\\boxed{1,234}") == 1234
    assert tasks.extract_answer("no box") is None
    assert tasks.is_correct("\\boxed{12}", "12") and not tasks.is_correct("\\boxed{13}", "12")


def test_cli_exports_jsonl(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert tasks.main(["generate", "--n", "7", "--level", "2", "--seed", "3", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 7 and all(r["level"] == 2 for r in recs)


def test_char_tokenizer_matches_fast_encoder():
    tok = T.load_hf_tokenizer()
    texts = [T.format_scored(r["problem"], r["solution"]) for r in tasks.eval_set(per_level=2)]
    texts += ["héllo wörld ✓ <s> </s>\t1234567890", "<pad><unk>< s>"]
    for t in texts:
        assert tok(t, add_special_tokens=True)["input_ids"] == T.encode(t)
    ids = tok("2024")["input_ids"]
    assert len(ids) == 4  # digits are single tokens
    assert tok("é")["input_ids"] == [T.UNK_ID]
    assert tok.decode(T.encode("12 + 3 = 15\n\\boxed{15}")) == "12 + 3 = 15\n\\boxed{15}"


def test_chat_template_renders_like_format_prompt():
    tok = T.load_hf_tokenizer()
    p = "Ava has 3 pens. She gets 4 more. How many pens does Ava have now?"
    msgs = [{"role": "user", "content": p}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == T.format_prompt(p)
    full = [*msgs, {"role": "assistant", "content": "3 + 4 = 7\n\\boxed{7}"}]
    assert tok.apply_chat_template(full, tokenize=False) == T.format_scored(p, "3 + 4 = 7\n\\boxed{7}")
    ids = T.encode(T.format_prompt(p))
    assert ids[0] == T.BOS_ID and ids.count(T.BOS_ID) == 1
    import ttscale.zoo as zoo

    assert zoo.format_prompt(p) == T.format_prompt(p)


def test_zoo_import_is_light():
    import subprocess
    import sys

    code = "import sys, ttscale.zoo, ttscale.models; print('torch' in sys.modules or 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_noisy_solution_stays_consistent():
    import random

    from ttscale.zoo.train import noisy_solution

    rng = random.Random(0)
    for r in itertools.islice(tasks.training_stream(seed=3), 300):
        s = noisy_solution(r["solution"], 0.5, rng)
        assert s.split("\n")[-1].startswith("\\boxed{")
        assert tasks.extract_answer(s) is not None


@pytest.mark.parametrize("unit", ["step", "digit", "size"])
def test_noisy_solution_units_keep_later_steps_consistent(unit):
    import random

    from ttscale.zoo.train import noisy_solution, step_labels

    rng = random.Random(1)
    n_wrong = 0
    for r in itertools.islice(tasks.training_stream(seed=4), 300):
        s = noisy_solution(r["solution"], 0.3, rng, unit)
        assert tasks.extract_answer(s) is not None
        labels = [ok for _, ok in step_labels(s)]
        # a slip makes exactly its own line wrong; every later line computes from the
        # slipped value, so "all right so far" drops once and never recovers
        assert labels == sorted(labels, reverse=True)
        wrong = not tasks.is_correct(s, r["answer"])
        n_wrong += wrong
        if wrong:
            assert 0.0 in labels
    assert 50 < n_wrong < 300


def test_digit_slips_grow_with_result_length():
    import random

    from ttscale.zoo.train import noisy_solution

    rng = random.Random(2)

    def wrong_rate(level, unit):
        recs = tasks.generate(200, level, 9, prefix="x")
        return sum(
            not tasks.is_correct(noisy_solution(r["solution"], 0.05, rng, unit), r["answer"]) for r in recs
        ) / len(recs)

    # per-digit slips: long solutions (level 5) go wrong far more often than level 1
    assert wrong_rate(5, "digit") > 3 * wrong_rate(1, "digit")
    # "size" raises the per-digit rate of long results further, not that of short ones
    assert wrong_rate(5, "size") > wrong_rate(5, "digit")


def test_dense_labels_mark_the_first_wrong_digit():
    from ttscale.zoo.train import dense_labels

    s = "12 + 5 = 17\n17 * 3 = 41\n41 - 1 = 40\n\\boxed{40}"
    got = [(s[p], ok) for p, ok in dense_labels(s)]
    assert got == [
        ("1", 1.0),
        ("7", 1.0),
        ("\n", 1.0),  # 17 is right
        ("4", 0.0),
        ("1", 0.0),
        ("\n", 0.0),  # 17 * 3 = 51, not 41
        ("\n", 0.0),
    ]  # later lines stay wrong
    s2 = "12 + 5 = 17\n17 * 3 = 54\n\\boxed{54}"
    assert [ok for _, ok in dense_labels(s2)][3:5] == [1.0, 0.0]  # "5" right, "4" wrong


def test_floor_div_keeps_slips_before_divisions():
    import random

    from ttscale.zoo.train import noisy_solution, step_labels

    recs = [r for r in tasks.generate(300, 5, 11, prefix="x") if " / " in r["solution"]]
    assert len(recs) > 100

    def wrong_rate(floor_div):
        rng = random.Random(5)
        out = 0
        for r in recs:
            s = noisy_solution(r["solution"], 0.05, rng, "digit", floor_div)
            labels = [ok for _, ok in step_labels(s)]
            assert labels == sorted(labels, reverse=True)  # wrong once, wrong for good
            out += not tasks.is_correct(s, r["answer"])
        return out / len(recs)

    # without floor_div a slip upstream of an inexact division drops all slips of that
    # solution; with it the division is floored and the slip stays
    assert wrong_rate(True) > 1.3 * wrong_rate(False)
    s = noisy_solution("10 + 5 = 15\n15 / 3 = 5\n\\boxed{5}", 1.0, random.Random(0), "step", True)
    first, second = s.split("\n")[:2]
    a = int(first.split(" = ")[1])
    assert a != 15 and second.startswith(f"{a} / 3 = ")  # slipped, and the division reads it


def test_expected_digits_stop_at_the_first_wrong_digit_of_a_line():
    from ttscale.zoo.train import expected_digits

    s = "12 + 30 = 42\n42 * 3 = 136\n136 - 6 = 130\n\\boxed{130}"
    got = [(s[p], want) for p, want in expected_digits(s)]
    # 42 * 3 is 126: the reader expects "2" where "3" was written, then stops reading that
    # result; the next line is judged on its own written operands (136 - 6 = 130 is right)
    assert got == [("4", "4"), ("2", "2"), ("1", "1"), ("3", "2"), ("1", "1"), ("3", "3"), ("0", "0")]


def test_previous_token_heads_attend_to_the_previous_position():
    torch = pytest.importorskip("torch")
    from transformers import LlamaModel

    from ttscale.zoo.train import init_previous_token_heads, llama_config

    cfg = llama_config((1, 64, 128, 4, 4), attention_bias=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = LlamaModel(cfg).eval()
    init_previous_token_heads(m.layers[0], cfg, heads=2)
    ids = torch.randint(3, T.VOCAB_SIZE, (1, 300))
    with torch.no_grad():
        att = m(input_ids=ids, output_attentions=True).attentions[0][0]  # heads, query, key
    n = ids.shape[1]
    prev = att[:, torch.arange(1, n), torch.arange(0, n - 1)]
    assert prev[:2].min() > 0.99  # the two initialised heads: all weight on t - 1
    assert prev[2:].mean() < 0.5  # the others are untouched (spread out)
