"""Shared fixtures: a real ttscale server (real vLLM on CPU) on loopback, driven over HTTP."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Overridable so the suite can run against other local models.
POLICY = os.environ.get("TTSCALE_TEST_POLICY", "ttscale-arith")
VERIFIER = os.environ.get("TTSCALE_TEST_VERIFIER", "ttscale-arith-verifier")
DRAFT = os.environ.get("TTSCALE_TEST_DRAFT", "ttscale-arith-draft")
START_TIMEOUT_S = float(os.environ.get("TTSCALE_TEST_START_TIMEOUT", "420"))
# Further `ttscale serve` options for every test server (e.g. vLLM engine options on a GPU host).
SERVER_ARGS = shlex.split(os.environ.get("TTSCALE_TEST_SERVER_ARGS", ""))
# A local Hugging Face model directory for the GPU tests of a real model (skipped when unset).
REAL_MODEL = os.environ.get("TTSCALE_TEST_REAL_MODEL")


def has_cuda() -> bool:
    from ttscale.engine.vllm_engine import has_cuda as probe

    return probe()


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a GPU answers (`make test-gpu`); elsewhere they are skipped."""
    if any("gpu" in item.keywords for item in items) and not has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU host)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    args: list[str]
    env: dict[str, str] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: the server shuts its engines down
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        # the server runs in its own session: nothing it started may outlive it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def broken(self) -> bool:
        """The process is gone or an engine of it died (a busy server is not broken)."""
        if self.proc.poll() is not None:
            return True
        for _ in range(3):
            try:
                return httpx.get(self.url + "/health", timeout=10).json().get("status") == "engine_down"
            except (httpx.HTTPError, ValueError):
                time.sleep(1.0)
        return True

    def restart(self) -> None:
        """The same server again, on the same port (clients made for it keep working)."""
        self.stop()
        self.restarts += 1
        fresh = _launch(self.args, self.port, self.log.with_name(f"{self.log.stem}.{self.restarts}.log"), self.env)
        self.proc, self.log = fresh.proc, fresh.log


def _launch(args: list[str], port: int, log: Path, env: dict[str, str] | None) -> Server:
    fh = open(log, "wb")  # noqa: SIM115 - the server writes its log here for as long as it runs
    proc = subprocess.Popen(
        args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )
    srv = Server(proc, port, log, args, env)
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.tail()}")
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    srv.stop()
    raise RuntimeError(f"server did not start in {START_TIMEOUT_S:.0f} s:\n{srv.tail()}")


def start_server(
    models: list[str], log: Path, *extra: str, python_args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Server:
    """A ttscale server on a free loopback port, ready (/health 200). ``python_args`` go before
    ``-m ttscale.cli`` (e.g. a profiler: ``("-m", "cProfile", "-o", path)``)."""
    port = free_port()
    # -P: a checkout in the working directory must not shadow the installed package
    args = [
        sys.executable,
        "-P",
        *python_args,
        "-m",
        "ttscale.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    for m in models:
        args += ["--model", m]
    args += SERVER_ARGS + list(extra)
    return _launch(args, port, log, env)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """The embedded family (policy, verifier, draft) on one server for the whole session."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    default = (POLICY, VERIFIER, DRAFT) == ("ttscale-arith", "ttscale-arith-verifier", "ttscale-arith-draft")
    # the default family is what `ttscale serve` with no model arguments serves: start it so
    srv = start_server([] if default else [POLICY, VERIFIER, DRAFT], log, "--log-level", "info")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _revive_the_session_server(request):
    """A test that finds the session's server broken (an engine died in an earlier test, which
    makes it exit) gets it started again, so one failure never fails the rest of the suite."""
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        if srv.broken():
            import warnings

            warnings.warn(f"the session's server was broken; restarting it:\n{srv.tail(20)}", stacklevel=1)
            srv.restart()
    yield


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def wait_until(pred, timeout: float = 30.0, every: float = 0.2) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(every)
    return pred()
