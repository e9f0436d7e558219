"""Resumable record store of an evaluation run.

A run directory holds:

* ``run.json``: the manifest (dataset and its fingerprint, models, sampling settings, prompt
  format, K, seed, ttscale version). A run resumes only with the same configuration (``force``
  overrides, except for the prompt format: samples drawn with two prompts are never mixed in
  one run).
* ``problems.jsonl``: append-only, one line per *finished* problem with all its samples, each
  line flushed and fsync'ed before the next problem is recorded. A killed run leaves at most a
  truncated last line; opening the store drops it (truncating the file back to the last
  complete record), so nothing that was finished is lost and nothing is recorded twice.

Problem record::

    {"id", "level"?, "subject"?, "gold", "prompt_tokens", "prefill_tokens", "cached_prefill_tokens",
     "wall_s",
     "samples": [{"i", "seed", "text"?, "answer", "correct", "tokens", "finish",
                  "mean_logprob", "sum_logprob", "score"?, "latency_s"}, ...]}

``prompt_tokens``: the prompt once; ``prefill_tokens``: every sample's engine request read it (K ×);
``cached_prefill_tokens``: of those, the prefix-cache hits the engine reported (null: none
reported); the samples' ``tokens`` are the decode tokens. Records written before these two keys
existed lack them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

MANIFEST = "run.json"
RECORDS = "problems.jsonl"

# Manifest keys that must match for a run to resume.
CONFIG_KEYS = ("dataset", "dataset_fingerprint", "model", "verifier", "k", "seed", "sampling", "prompt")
# The value of a key in a manifest written before the key was recorded.
LEGACY = {"prompt": {"system": None, "template": "{problem}"}}


class ConfigMismatch(RuntimeError):
    pass


class RunStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: TextIO | None = None

    # -- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return manifest

    def open(self, manifest: dict[str, Any], *, force: bool = False) -> set[str]:
        """Create or resume the run; returns the ids of the problems already recorded."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.exists():
            old, new = {**LEGACY, **self.read_manifest()}, {**LEGACY, **manifest}
            diff = [k for k in CONFIG_KEYS if old.get(k) != new.get(k)]
            if "prompt" in diff:  # --force does not override this one
                was, now = _prompt_desc(old.get("prompt")), _prompt_desc(new.get("prompt"))
                raise ConfigMismatch(
                    f"{self.path} holds samples drawn with another prompt (recorded: {was}; "
                    f"this run: {now}); resuming would mix samples of two prompts "
                    "(--force does not apply): give the recorded --prompt-template / --system-prompt, "
                    "or use another run directory"
                )
            if diff and not force:
                raise ConfigMismatch(
                    f"{self.path} holds a run with a different configuration ({', '.join(diff)}); "
                    "use another run directory, or --force to continue it anyway"
                )
            if diff:
                manifest = {**manifest, "forced_from": {k: old.get(k) for k in diff}}
            manifest = {**manifest, "created": old.get("created", manifest.get("created"))}
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        done = self._repair_and_ids()
        self._fh = open(self.records_path, "a", encoding="utf-8")  # noqa: SIM115 (held open until close())
        return done

    def _repair_and_ids(self) -> set[str]:
        """Drop a truncated / unreadable tail; ids of the complete records."""
        p = self.records_path
        if not p.exists():
            return set()
        ids: set[str] = set()
        good_end = 0
        with open(p, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # no newline: the last write did not finish
            try:
                rec = json.loads(data[pos:nl])
            except ValueError:
                break
            ids.add(rec["id"])
            pos = good_end = nl + 1
        if good_end < len(data):
            with open(p, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return ids

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise RuntimeError("store is not open")
        self._fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """Complete records in file order (a truncated last line is skipped)."""
        if not self.records_path.exists():
            return
        with open(self.records_path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return
                try:
                    yield json.loads(line)
                except ValueError:
                    return


def load_run(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, records) of a run directory; duplicate ids (a forced rerun) keep the first."""
    store = RunStore(path)
    if not store.exists():
        raise FileNotFoundError(f"{path} is not a run directory (no {MANIFEST})")
    seen: set[str] = set()
    recs = []
    for r in store.records():
        if r["id"] not in seen:
            seen.add(r["id"])
            recs.append(r)
    return store.read_manifest(), recs


def _prompt_desc(p: Any) -> str:
    if not isinstance(p, dict):
        return repr(p)
    system = p.get("system")
    return f"system prompt {'none' if system is None else repr(system)}, template {p.get('template')!r}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
