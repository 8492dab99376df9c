"""Session-wide fixtures: the shared real data, a small real tokenizer, real shards of it."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the per-environment DeepSpeed ops cache that scripts/setup_env.sh pre-built (megagpt/envsetup.py)
from megagpt.envsetup import set_torch_extensions_dir  # noqa: E402

set_torch_extensions_dir()


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
