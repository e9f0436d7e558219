"""Prompt formats of eval runs: templates, defaults, the manifest, refusals and rescoring (fake engine)."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from ttscale.engine.fake import FakeEngine
from ttscale.eval.prompts import BOXED, PLAIN, PromptFormat, default_prompt, resolve_prompt, unescape
from ttscale.eval.runner import EvalRunner, RunConfig, rescore
from ttscale.eval.store import ConfigMismatch, RunStore, load_run

QWEN = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_boxed_preset_is_the_qwen_instruction_and_braces_survive():
    assert BOXED == QWEN
    fmt = PromptFormat(BOXED)
    assert fmt.user("What is $\\frac{1}{2}+1$?") == (
        "What is $\\frac{1}{2}+1$?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert fmt.messages("2+2?") == [{"role": "user", "content": fmt.user("2+2?")}]
    sys_fmt = PromptFormat("Q: {problem}", system="You are a careful solver.")
    assert sys_fmt.messages("2+2?") == [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Q: 2+2?"},
    ]
    assert fmt.preset == "boxed" and PromptFormat().preset == "plain" and sys_fmt.preset is None


@pytest.mark.parametrize(
    ("dataset", "template"),
    [
        *((name, BOXED) for name in ("math500", "aime24", "aime25", "amc23", "gsm8k")),
        *((name, PLAIN) for name in ("arith500", "my_set", "hf:org/set:test")),
    ],
)
def test_default_per_dataset(dataset, template):
    assert default_prompt(dataset) == PromptFormat(template)
    assert resolve_prompt(dataset) == PromptFormat(template)


def test_resolve_presets_templates_and_system():
    assert resolve_prompt("math500", "plain") == PromptFormat(PLAIN)
    assert resolve_prompt("arith500", "boxed") == PromptFormat(BOXED)
    assert resolve_prompt("arith500", "Problem: {problem}\nSolution:", "Be brief.") == PromptFormat(
        "Problem: {problem}\nSolution:", "Be brief."
    )
    assert resolve_prompt("math500", None, "") == PromptFormat(BOXED)  # an empty system prompt: none


@pytest.mark.parametrize(
    ("template", "system", "message"),
    [
        ("Solve it.", None, "--prompt-template does not contain {problem}"),
        ("{problem} and again {problem}", None, "--prompt-template contains 2 times {problem}"),
        ("{Problem}", None, "--prompt-template does not contain {problem}"),
        ("{problem}", "  \n", "--system-prompt is blank"),
    ],
)
def test_bad_formats_name_the_option(template, system, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        PromptFormat(template, system)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("{problem}\\n\\nPlease reason step by step, and put your final answer within \\\\boxed{}.", QWEN),
        ("{problem}\\n\\nput it in \\boxed{}.", "{problem}\n\nput it in \\boxed{}."),  # \b is no escape
        ("a \\\\neq b", "a \\neq b"),  # \\ first: a literal backslash before n
        ("tab \\t stays", "tab \\t stays"),
        ("no escapes", "no escapes"),
    ],
)
def test_unescape(raw, text):
    assert unescape(raw) == text


def test_format_round_trips_and_legacy_is_plain():
    fmt = PromptFormat("Q: {problem}", "S")
    assert PromptFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    assert PromptFormat.from_dict(None) == PromptFormat(PLAIN)


# -- runs --------------------------------------------------------------------------------------


def _write_set(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "problem": f"What is {i}?", "answer": str(i % 4)}) + "\n")


def _seen_respond(prompt: str, s) -> str:
    """Answers 1 when the rendered prompt carries the system prompt and the template, else 0."""
    ok = prompt.startswith("system: Think.\nuser: Q: What is ") and prompt.endswith("? Answer in a box.\n")
    return f"\\boxed{{{int(ok)}}}"


def _cfg(data, **kw):
    return RunConfig(dataset=str(data), model="fake", verifier="fake-v", k=2, concurrency=2, **kw)


def _run(cfg, out, **kw):
    pol = FakeEngine("fake", respond=_seen_respond)
    ver = FakeEngine("fake-v", role="score", scorer=lambda text: 0.9 if text.startswith("system: Think.") else 0.1)
    return asyncio.run(EvalRunner(cfg, out, policy=pol, verifier=ver, progress=False, **kw).run())


def test_runner_sends_and_records_the_prompt_and_refuses_another_on_resume(tmp_path):
    data = tmp_path / "set.jsonl"
    _write_set(data, 4)
    cfg = _cfg(data, prompt_template="Q: {problem} Answer in a box.", system_prompt="Think.")
    _run(cfg, tmp_path / "run")
    manifest, recs = load_run(tmp_path / "run")
    assert manifest["prompt"] == {"system": "Think.", "template": "Q: {problem} Answer in a box."}
    # the policy saw the formatted prompt, the verifier read the same conversation
    assert all(s["answer"] == "1" and s["score"] == 0.9 for r in recs for s in r["samples"])

    # the same format resumes (nothing left to do)
    assert _run(cfg, tmp_path / "run")["resumed_with"] == 4
    # another template, another system prompt, or none: refused, even with force
    for other in (
        _cfg(data, prompt_template="Q: {problem}", system_prompt="Think."),
        _cfg(data, prompt_template="Q: {problem} Answer in a box."),
    ):
        for force in (False, True):
            with pytest.raises(ConfigMismatch, match="another prompt") as e:
                _run(other, tmp_path / "run", force=force)
            assert "--prompt-template" in str(e.value) and "would mix samples" in str(e.value)
    assert len((tmp_path / "run" / "problems.jsonl").read_text().splitlines()) == 4


def test_a_run_recorded_before_prompts_were_recorded_resumes_only_as_plain(tmp_path):
    data = tmp_path / "set.jsonl"
    _write_set(data, 3)
    _run(_cfg(data), tmp_path / "run")  # arith-style default: plain
    path = tmp_path / "run" / "run.json"
    legacy = json.loads(path.read_text())
    assert legacy.pop("prompt") == {"system": None, "template": "{problem}"}
    path.write_text(json.dumps(legacy))
    assert _run(_cfg(data), tmp_path / "run")["resumed_with"] == 3
    path.write_text(json.dumps(legacy))
    with pytest.raises(ConfigMismatch, match=r"recorded: system prompt none, template '\{problem\}'"):
        _run(_cfg(data, prompt_template="boxed"), tmp_path / "run")


def test_rescore_reads_the_run_prompt(tmp_path):
    data = tmp_path / "set.jsonl"
    _write_set(data, 3)
    _run(_cfg(data, prompt_template="Q: {problem} Answer in a box.", system_prompt="Think."), tmp_path / "src")
    seen = "system: Think.\nuser: Q:"
    ver = FakeEngine("v2", role="score", scorer=lambda text: 0.8 if text.startswith(seen) else 0.2)
    asyncio.run(rescore(tmp_path / "src", tmp_path / "re", "v2", engine=ver))
    manifest, recs = load_run(tmp_path / "re")
    assert manifest["prompt"]["system"] == "Think."
    assert [s["score"] for r in recs for s in r["samples"]] == [0.8] * 6


def test_store_compares_prompts_of_manifests_without_one(tmp_path):
    base = {"dataset": "d", "dataset_fingerprint": "f", "model": "m", "verifier": None, "k": 1, "seed": 0}
    RunStore(tmp_path).open(base)
    RunStore(tmp_path).open({**base, "prompt": {"system": None, "template": "{problem}"}})
    with pytest.raises(ConfigMismatch, match="another prompt"):
        RunStore(tmp_path).open({**base, "prompt": {"system": None, "template": BOXED}})


def test_cli_bad_template_is_an_error_naming_the_option(tmp_path):
    from ttscale.eval.cli import app

    data = tmp_path / "set.jsonl"
    _write_set(data, 2)
    res = CliRunner().invoke(
        app, ["run", str(data), "--model", "fake", "--prompt-template", "Solve this.", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert "--prompt-template does not contain {problem}" in res.output
    assert not (tmp_path / "o").exists()  # refused before anything was written
