"""Session-wide fixtures: the shared real data, a small real tokenizer, real shards of it."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the per-environment DeepSpeed caches (megagpt/envsetup.py): the ops scripts/setup_env.sh pre-built
from megagpt.envsetup import prepare_deepspeed  # noqa: E402

prepare_deepspeed()


def interpreter_ready() -> bool:
    """Whether this process can run the Triton kernels in the CPU interpreter (tests/test_kernels_*.py).

    Triton reads TRITON_INTERPRET when each ``@triton.jit`` function is *defined*, its own
    ``tl.sum``/``tl.max`` helpers included, so it works only if set before triton's first import
    in the process: set here when nothing has imported triton yet. Otherwise (another test module
    imported it, e.g. via deepspeed) the test file re-runs itself with ``rerun_interpreted``."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return True
    from megagpt_kernels.triton import interpreting

    if not interpreting():
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def interpreted_or_rerun(module_globals: dict) -> bool:
    """A kernel test module's preamble, called before it imports triton: skips the module without
    triton; True if this process interprets the kernels; else False, after adding the module's one
    test, which reruns the whole file in an interpreter process."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)
    if interpreter_ready():
        return True

    def test_in_triton_interpreter_subprocess():
        rc, out = rerun_interpreted(module_globals["__file__"])
        assert rc == 0, out[-6000:]

    module_globals["test_in_triton_interpreter_subprocess"] = test_in_triton_interpreter_subprocess
    return False


def rerun_interpreted(test_file: str, timeout: float = 300):
    """Run one pytest file in a fresh process with TRITON_INTERPRET=1; returns (returncode, output)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (clone megagpt beside shared/)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_txt(shared_data) -> Path:
    return shared_data / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, shakespeare_txt) -> str:
    """A real sentencepiece BPE model (vocab 1000, reserved specials) trained on tinyshakespeare."""
    from megagpt.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tok") / "shakespeare"
    train_sentencepiece([str(shakespeare_txt)], str(out), vocab_size=1000, model_type="bpe")
    return str(out) + ".model"


@pytest.fixture(scope="session")
def shakespeare_prefix(tmp_path_factory, shakespeare_txt, sp_model) -> str:
    """tinyshakespeare preprocessed with ``sp_model``: one document per blank-line paragraph."""
    from megagpt.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards") / "shakespeare"
    preprocess([str(shakespeare_txt)], str(out), sp_model, split_paragraphs=True, workers=1)
    return str(out) + "_text_document"
