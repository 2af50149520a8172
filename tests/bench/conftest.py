from tests.whisper.fixtures import tiny_ct2_dir, tiny_hf_model  # noqa: F401 (the Whisper experiment's model)
