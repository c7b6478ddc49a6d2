import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tiny import TinyTokenizer, random_seqs, tiny_model  # noqa: E402

from attncache import AttnCache, BuildConfig  # noqa: E402


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Per family: (model, cache built from seqs with fp32 maps, seqs). Built once per session."""
    out = {}

    def get(family: str):
        if family not in out:
            model = tiny_model(family)
            seqs = random_seqs(10, seed=1)
            db = tmp_path_factory.mktemp(f"db-{family}") / "db"
            cache = AttnCache.build(
                model, TinyTokenizer(), seqs, db, BuildConfig(codec="float32"), progress=False
            )
            out[family] = (model, cache, seqs)
        return out[family]

    return get


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Per family: the path of a tiny random HF model folder with a character tokenizer."""
    from tiny import save_tiny_hf

    out = {}

    def get(family: str = "llama"):
        if family not in out:
            out[family] = str(save_tiny_hf(family, tmp_path_factory.mktemp(f"hf-{family}")))
        return out[family]

    return get
