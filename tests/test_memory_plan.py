"""The GPU memory plan: pure arithmetic, checked with the embedded checkpoints and model configs
of real shapes (no GPU needed)."""

from __future__ import annotations

import json

import pytest

from ttscale.engine.memory import (
    DEFAULT_SHARE,
    GIB,
    MIN_GENERATE_KV_TOKENS,
    MemoryNeed,
    kv_bytes_per_token,
    need_of,
    plan_gpu_memory,
)
from ttscale.errors import ConfigError
from ttscale.models import DEFAULT_MODEL, DRAFT_MODEL, VERIFIER_MODEL, embedded_path

H200 = int(139.8 * GIB)


def _qwen_dir(tmp_path, name="qwen", layers=28, kv_heads=2, hidden=1536, heads=12, weights_gib=3.1):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "hidden_size": hidden,
                "torch_dtype": "bfloat16",
            }
        )
    )
    with open(d / "model.safetensors", "wb") as f:  # sparse: the size is what the plan reads
        f.truncate(int(weights_gib * GIB))
    return d


def test_kv_bytes_per_token_of_a_qwen_shape(tmp_path):
    d = _qwen_dir(tmp_path)
    # K and V, 28 layers, 2 KV heads of 128 dims, bf16
    assert kv_bytes_per_token(d) == 2 * 28 * 2 * 128 * 2
    assert kv_bytes_per_token(d, kv_cache_dtype="fp8") == 2 * 28 * 2 * 128
    assert kv_bytes_per_token(d, tensor_parallel=2) == 2 * 28 * 1 * 128 * 2


def test_embedded_family_fits_one_gpu_policy_gets_the_most():
    needs = [
        need_of(n, r, embedded_path(n), {})
        for n, r in ((DEFAULT_MODEL, "generate"), (VERIFIER_MODEL, "score"), (DRAFT_MODEL, "generate"))
    ]
    plan = plan_gpu_memory(needs, H200)
    f = plan.fractions
    assert sum(f.values()) <= DEFAULT_SHARE + 1e-9
    assert f[VERIFIER_MODEL] < 0.05  # a scorer needs its weights and a small KV cache
    assert f[DEFAULT_MODEL] > f[VERIFIER_MODEL] and f[DRAFT_MODEL] > f[VERIFIER_MODEL]
    assert "GPU memory plan" in plan.describe() and DRAFT_MODEL in plan.describe()


def test_kv_shared_in_proportion_to_kv_bytes_per_token(tmp_path):
    big = _qwen_dir(tmp_path, "policy", layers=28, kv_heads=4, hidden=3584, heads=28, weights_gib=15.2)
    small = _qwen_dir(tmp_path, "draft", layers=24, kv_heads=2, hidden=896, heads=14, weights_gib=1.0)
    needs = [need_of("policy", "generate", big, {}), need_of("draft", "generate", small, {})]
    plan = plan_gpu_memory(needs, H200)
    per_tok = {n.name: n.kv_bytes_per_token for n in needs}
    tokens = {k: plan.kv_bytes[k] / per_tok[k] for k in per_tok}
    assert tokens["policy"] == pytest.approx(tokens["draft"], rel=1e-3)  # same number of tokens each
    assert plan.fractions["policy"] > 3 * plan.fractions["draft"]


def test_user_share_is_kept_and_the_rest_fits_around_it(tmp_path):
    a = _qwen_dir(tmp_path, "a")
    b = _qwen_dir(tmp_path, "b")
    needs = [need_of("a", "generate", a, {"gpu_memory_utilization": 0.5}), need_of("b", "generate", b, {})]
    plan = plan_gpu_memory(needs, H200, share=0.8)
    assert plan.fractions["a"] == 0.5
    assert 0.25 < plan.fractions["b"] <= 0.3


def test_weights_are_what_the_loader_reads(tmp_path):
    d = _qwen_dir(tmp_path, weights_gib=2.0)
    with open(d / "optimizer.pt", "wb") as f:  # a trainer's leftover: not weights
        f.truncate(4 * GIB)
    with open(d / "pytorch_model.bin", "wb") as f:  # the same weights in the other format
        f.truncate(2 * GIB)
    assert need_of("m", "generate", d, {}).weight_bytes == 2 * GIB
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 3 * GIB}}))
    assert need_of("m", "generate", d, {}).weight_bytes == 3 * GIB


def test_tensor_parallel_splits_the_weights(tmp_path):
    d = _qwen_dir(tmp_path, weights_gib=8.0)
    one = need_of("m", "generate", d, {})
    two = need_of("m", "generate", d, {"tensor_parallel_size": 2})
    assert two.weight_bytes == one.weight_bytes // 2


def test_models_that_do_not_fit_are_named_with_their_numbers(tmp_path):
    a = _qwen_dir(tmp_path, "big-a", weights_gib=70)
    b = _qwen_dir(tmp_path, "big-b", weights_gib=70)
    needs = [need_of("big-a", "generate", a, {}), need_of("big-b", "generate", b, {})]
    with pytest.raises(ConfigError) as e:
        plan_gpu_memory(needs, H200)
    msg = e.value.message
    assert "do not fit" in msg and "big-a" in msg and "big-b" in msg and "70.00 GiB" in msg
    assert e.value.code == "gpu_memory"


def test_free_memory_bounds_the_plan():
    need = MemoryNeed("m", "generate", weight_bytes=GIB, kv_bytes_per_token=1 << 15)
    plan = plan_gpu_memory([need], H200, free_bytes=40 * GIB)
    assert plan.fractions["m"] * H200 <= 40 * GIB
    with pytest.raises(ConfigError):  # less free than weights + working set + minimal KV
        plan_gpu_memory([need], H200, free_bytes=int(3.5 * GIB) + MIN_GENERATE_KV_TOKENS)


def test_a_user_share_below_the_weights_is_refused(tmp_path):
    d = _qwen_dir(tmp_path, weights_gib=20)
    with pytest.raises(ConfigError, match="less than its weights"):
        plan_gpu_memory([need_of("m", "generate", d, {"gpu_memory_utilization": 0.1})], H200)


# -- CPU engines sharing the cores ---------------------------------------------------------------


@pytest.fixture
def clean_omp(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TTSCALE_CPU_THREADS", "TTSCALE_SET_OMP_NUM_THREADS"):
        monkeypatch.setenv(var, "x")  # recorded, so that what the policy sets is undone after the test
        monkeypatch.delenv(var)
    return monkeypatch


def test_cpu_engines_sharing_the_cores_split_them_and_wait_passively(clean_omp):
    import os

    from ttscale.engine.vllm_engine import cpu_thread_policy

    assert cpu_thread_policy(3, cores=2) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert os.environ["OMP_NUM_THREADS"] == "1"  # what the engine processes start with
    assert cpu_thread_policy(3, cores=16)["OMP_NUM_THREADS"] == "5"  # ours: recomputed


def test_a_single_cpu_engine_keeps_every_core_and_spins(clean_omp):
    from ttscale.engine.vllm_engine import cpu_thread_policy

    assert cpu_thread_policy(1, cores=8) == {"OMP_NUM_THREADS": "8"}


def test_the_users_openmp_settings_win(clean_omp):
    from ttscale.engine.vllm_engine import cpu_thread_policy

    clean_omp.setenv("OMP_NUM_THREADS", "4")
    clean_omp.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cpu_thread_policy(3, cores=2) == {"OMP_WAIT_POLICY": "ACTIVE"}
    clean_omp.setenv("TTSCALE_CPU_THREADS", "off")
    assert cpu_thread_policy(3, cores=2) == {}
    clean_omp.delenv("OMP_NUM_THREADS")
    clean_omp.setenv("TTSCALE_CPU_THREADS", "2")
    assert cpu_thread_policy(3, cores=2)["OMP_NUM_THREADS"] == "2"


# -- the longest token, for the length check before tokenization -----------------------------------


def _trained(model, pre_tokenizer, trainer):
    from tokenizers import Tokenizer

    t = Tokenizer(model)
    t.pre_tokenizer = pre_tokenizer
    t.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 50, trainer)
    return t


def test_longest_token_bounds_the_characters_of_a_byte_level_bpe_tokenizer():
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ttscale.engine.vllm_engine import _longest_token

    t = _trained(models.BPE(), pre_tokenizers.ByteLevel(), trainers.BpeTrainer(vocab_size=300))
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    n = _longest_token(tok)
    assert n is not None and n >= 2
    for text in ["the cat sat on the mat", "zzz qqq", "ünïcödé ☃"]:
        ids = tok.encode(text)
        assert len(ids) >= len(text) / n  # the bound the server refuses long prompts by


def test_no_length_bound_where_an_unknown_token_covers_a_whole_word():
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ttscale.engine.vllm_engine import _longest_token

    t = _trained(
        models.WordPiece(unk_token="[UNK]"),
        pre_tokenizers.Whitespace(),
        trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]"]),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    assert tok.encode("supercalifragilistic") and _longest_token(tok) is None
