"""The offline toy world: preference data with a known truth (world.py), written once into the cache (cache.py);
a tiny tokenizer and pre-trained tiny base model that ship with the package (base/, made by build.py); its
judge (judge.py).

Importing it registers the name `toy` (names.py) as a data source (data.train: toy), a model (model.name: toy)
and an online judge (online.judge: toy). It is a plugin of lora-dpo (entry-point group `lora_dpo.plugins`), so the
first lookup of a name imports it: nothing needs to import it first.
"""

from .. import names
from .build import toy_model_path
from .cache import toy_data_files, world_key
from .judge import UNGRAMMATICAL_SCORE, ToyJudge, toy_quality
from .world import (MAX_SENTENCES, WORLD_VERSION, is_grammatical, make_pairs, positive_share, sample_prompt,
                    sample_review, sentiment_score)

names.register("data", "toy", toy_data_files)
names.register("model", "toy", toy_model_path)
names.register("judge", "toy", ToyJudge)

__all__ = [
    "MAX_SENTENCES", "UNGRAMMATICAL_SCORE", "WORLD_VERSION", "ToyJudge", "is_grammatical", "make_pairs",
    "positive_share", "sample_prompt", "sample_review", "sentiment_score", "toy_data_files", "toy_model_path",
    "toy_quality", "world_key",
]  # fmt: skip
