"""Fixtures shared by the Whisper tests: one tiny random model in HF and CTranslate2 layout."""

import pytest

from tests.whisper.tiny_whisper import make_tiny_whisper, save_ct2, save_hf


@pytest.fixture(scope="session")
def tiny_hf_model():
    return make_tiny_whisper()


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_model, tmp_path_factory):
    return save_hf(tiny_hf_model, tmp_path_factory.mktemp("tiny_whisper_hf"))


@pytest.fixture(scope="session")
def tiny_ct2_dir(tiny_hf_model, tmp_path_factory):
    return save_ct2(tiny_hf_model, tmp_path_factory.mktemp("tiny_whisper_ct2"))
