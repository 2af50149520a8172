import pytest

import encdec
from tests.tiny_models import ENGINE_OVERRIDES, save_hf_model
from tests.whisper.fixtures import (  # noqa: F401 (the Whisper fixtures)
    espeak_clips,
    tiny_ct2_dir,
    tiny_hf_model,
    whisper_base_path,
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One tiny random T5 and BART whose greedy outputs depend on their input, loaded once."""
    out = {}
    for family in ("t5", "bart"):
        d = tmp_path_factory.mktemp(f"engine_{family}")
        save_hf_model(family, d, config=ENGINE_OVERRIDES[family])
        out[family] = encdec.load_pretrained(d)
    return out
