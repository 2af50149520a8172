"""Fixtures shared by the Whisper tests (defined in ``tests/whisper/fixtures.py``)."""

from tests.whisper.fixtures import (  # noqa: F401
    espeak_clips,
    tiny_ct2_dir,
    tiny_hf_dir,
    tiny_hf_model,
    tiny_longform_ct2_dir,
    tiny_longform_hf_model,
    whisper_base_path,
)
