"""The offline toy world: preference data with a known truth (world.py), a tiny tokenizer and a pre-trained tiny
base model built once (build.py), and its judge (judge.py).

Importing it registers the name `toy` where lora-dpo looks names up: as a data source (data.train: toy), a model
(model.name: toy) and an online judge (online.judge: toy). The command line and the Python API import it.
"""

from ..data.sources import register_source
from ..methods.judges import register_judge
from ..model.load import register_model
from .build import toy_data_files, toy_model_path, world_key
from .judge import UNGRAMMATICAL_SCORE, ToyJudge, toy_quality
from .world import (MAX_SENTENCES, WORLD_VERSION, is_grammatical, make_pairs, positive_share, sample_prompt,
                    sample_review, sentiment_score)

register_source("toy", toy_data_files)
register_model("toy", toy_model_path)
register_judge("toy", ToyJudge)

__all__ = [
    "MAX_SENTENCES", "UNGRAMMATICAL_SCORE", "WORLD_VERSION", "ToyJudge", "is_grammatical", "make_pairs",
    "positive_share", "sample_prompt", "sample_review", "sentiment_score", "toy_data_files", "toy_model_path",
    "toy_quality", "world_key",
]  # fmt: skip
