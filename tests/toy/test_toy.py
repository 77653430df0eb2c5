"""The toy world: its known truth, its preference pairs, its tokenizer, its cache, and its shipped base model."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dpo import paths
from lora_dpo.paths import build_once
from lora_dpo.data.tokenize import encode_completion, encode_prompt
from lora_dpo.toy import build, cache, toy_model_path, world

ADJECTIVES = world.POSITIVE + world.NEGATIVE + world.NEUTRAL
WORLD_WORDS = ADJECTIVES + world.ASPECTS + world.VERBS + world.TITLE_WORDS[0] + world.TITLE_WORDS[1]


@pytest.fixture(scope="module")
def toy_tokenizer():
    return build.build_tokenizer()


# ------------------------------------------------------------------------------------------ the known truth
@pytest.mark.parametrize(
    "text, score",
    [
        ("the acting was superb . the plot felt dull . the music was loud .", 0),  # +1 -1, loud is neutral
        # +2: "loved" is not one of the adjectives
        ("i loved it . the acting was superb . the plot is brilliant . the music was loud .", 2),
        ("The Acting Was SUPERB! the ending seemed awful, the cast terrible and the script weak.", -2),  # +1 -3
        ("the plot was there .", 0),  # no adjective of the world
        ("", 0),
    ],
)
def test_sentiment_score_is_positive_minus_negative_words(text, score):
    assert world.sentiment_score(text) == score


@pytest.mark.parametrize(
    "text, share",
    [
        ("the acting was superb . the plot felt dull . the music was loud .", 1 / 3),  # 1 of 3 slots
        ("i hated it . the acting was superb . the plot is brilliant . the music is loud . the cast was weak .", 2 / 4),
        ("the story was charming . the ending seemed moving . the cast felt clever .", 1.0),
        ("the story was quiet . the ending seemed tedious .", 0.0),  # slots, none positive
        ("the plot was there .", 0.0),  # no slot at all
        ("", 0.0),
    ],
)
def test_positive_share_is_positive_words_over_all_adjective_slots(text, share):
    assert world.positive_share(text) == pytest.approx(share)


def test_word_lists_are_disjoint_and_prompts_carry_no_sentiment():
    lists = [set(world.POSITIVE), set(world.NEGATIVE), set(world.NEUTRAL), set(world.ASPECTS)]
    assert sum(map(len, lists)) == len(set().union(*lists))
    rng = random.Random(0)
    prompts = [world.sample_prompt(rng) for _ in range(200)]
    assert all(world.positive_share(p) == 0.0 and world.sentiment_score(p) == 0 for p in prompts)


def test_neutral_generator_gives_each_sentiment_a_third_of_the_slots():
    """6000 reviews hold ~21,000 adjective slots, but a review's slots share its verdict, so the review is the
    unit: the pooled share has variance (2/9) E[n^2] / (N E[n]^2) for n = 3 or 4 slots, a standard deviation of
    sqrt(0.2268 / 6000) = 0.0061. A tolerance of 0.025 is 4 of them, while a generator that favoured one verdict
    by 3 points in 100 would fail."""
    rng = random.Random(123)
    reviews = [world.sample_review(rng) for _ in range(6000)]
    words = " ".join(reviews).split()
    slots = sum(w in ADJECTIVES for w in words)
    assert slots > 20_000
    assert world.positive_share(" ".join(reviews)) == pytest.approx(1 / 3, abs=0.025)
    assert sum(w in world.NEGATIVE for w in words) / slots == pytest.approx(1 / 3, abs=0.025)


def test_every_adjective_of_a_review_follows_its_verdict():
    rng = random.Random(0)
    for _ in range(300):
        verdict, *sentences = world.sample_review(rng).split(" . ")
        adjectives = [s.rstrip(" .").split()[-1] for s in sentences]
        expected = dict((v.rstrip(" ."), words) for v, words in world.VERDICTS)[verdict]
        assert 3 <= len(adjectives) <= 4 and all(a in expected for a in adjectives)


def test_generated_reviews_are_grammatical_and_broken_ones_are_not():
    rng = random.Random(0)
    assert all(world.is_grammatical(world.sample_review(rng)) for _ in range(500))
    good = "i hated it . the acting was superb . the plot is dull . the music seemed loud ."
    assert world.is_grammatical(good)  # form only: an adjective may disagree with the verdict
    for bad in [
        "the acting was superb . the plot is dull . the music seemed loud .",  # no verdict
        "i adored it . the acting was superb . the plot is dull . the music seemed loud .",  # not a verdict
        "i loved it . the acting was superb . the plot felt dull .",  # 2 sentences
        "i loved it . " + "the acting was superb . " * 5,  # 5 sentences
        "i loved it . the acting was superb . the plot was was dull . the music was loud .",
        "i loved it . the acting was superb . the was dull . the music was loud .",  # no aspect
        "i loved it . the acting was good . the plot felt dull . the music was loud .",  # not a world adjective
        "i loved it . the acting was superb . the plot felt dull . the music was loud",  # unfinished
        "",
    ]:
        assert not world.is_grammatical(bad), bad


# --------------------------------------------------------------------------------------------------- pairs
def test_make_pairs_prefers_the_more_positive_review_in_every_row():
    rows = world.make_pairs(300, seed=0)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) for v in row.values())
        assert world.sentiment_score(row["chosen"]) > world.sentiment_score(row["rejected"])
    # chosen reviews are more positive on average, as DPO should learn
    mean = lambda key: sum(world.positive_share(r[key]) for r in rows) / len(rows)  # noqa: E731
    assert mean("chosen") > 0.45 > 0.33 > 0.22 > mean("rejected")


def test_make_pairs_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert world.make_pairs(50, seed=7) == world.make_pairs(50, seed=7)
    assert world.make_pairs(50, seed=7) != world.make_pairs(50, seed=8)


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_encodes_every_world_word_as_one_token(toy_tokenizer):
    for word in WORLD_WORDS + ("the", "loved", "hated", "watched", "it", "a", "review", ".", "?"):
        assert len(toy_tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    rng = random.Random(0)  # in context too, including the first word of a prompt or a review (no space)
    for text in [world.sample_prompt(rng) for _ in range(100)] + [world.sample_review(rng) for _ in range(100)]:
        assert len(toy_tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text.split()), text


@pytest.mark.parametrize(
    "text",
    [
        "i loved it . the acting was superb . the plot is dull . the music seemed loud .",
        "write a brief review of the night train .",
        "Any text at all: naïve café, 42 + 7 = 49, emoji 🎬, tabs\tand\nnewlines.",
    ],
)
def test_tokenizer_round_trips_text(toy_tokenizer, text):
    ids = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert toy_tokenizer.decode(ids) == text


def test_chat_template_and_special_tokens(toy_tokenizer):
    tok = toy_tokenizer
    messages = [
        {"role": "system", "content": "be brief ."},
        {"role": "user", "content": "review the red king ."},
        {"role": "assistant", "content": "i hated it . the plot was dull ."},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|system|>be brief .<|end|><|user|>review the red king .<|end|><|assistant|>i hated it . the plot was dull ."
        "<|end|>"
    )
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|end|><|assistant|>"
    )
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= 1024
    # each special token is one id, never split into bytes
    for special in build.SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_prompts_and_reviews_fit_their_token_budgets(toy_tokenizer):
    rng = random.Random(0)
    prompt_lengths = [len(encode_prompt(toy_tokenizer, world.sample_prompt(rng))) for _ in range(300)]
    review_lengths = [len(encode_completion(toy_tokenizer, world.sample_review(rng))) for _ in range(300)]
    assert max(prompt_lengths) <= 20 and max(review_lengths) <= 40


# --------------------------------------------------------------------------------------------------- cache
def test_cache_root_is_the_env_var_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path))
    assert paths.cache_root() == tmp_path
    monkeypatch.delenv("LORA_DPO_CACHE")
    assert paths.cache_root() == Path.home() / ".cache" / "lora_dpo"


def test_toy_data_files_are_written_once_in_standard_format(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path))
    files = cache.toy_data_files()
    assert Path(files["train"]).parent == tmp_path / "toy" / f"data-{cache.world_key()}"
    train = [json.loads(line) for line in open(files["train"])]
    test = [json.loads(line) for line in open(files["test"])]
    assert (len(train), len(test)) == (cache.TRAIN_PAIRS, cache.TEST_PAIRS)
    assert train[:5] == world.make_pairs(5, cache.TRAIN_SEED)
    assert train[0] != test[0]
    mtime = Path(files["train"]).stat().st_mtime_ns
    assert cache.toy_data_files() == files and Path(files["train"]).stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [f"data-{cache.world_key()}"]  # no temporary left


def test_build_once_keeps_the_folder_of_a_build_that_finished_first(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path))
    target = tmp_path / "toy" / "thing"

    def racing_build(folder):  # another process renames its finished build into place while we build
        (folder / "ours.txt").write_text("ours")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")

    assert build_once(target, racing_build, "a thing") == target
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["thing"]  # our temporary folder is gone


def test_build_once_leaves_nothing_behind_when_the_build_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path))
    target = tmp_path / "toy" / "thing"

    def failing_build(folder):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(target, failing_build, "a thing")
    assert list(target.parent.iterdir()) == []


def test_a_killed_builds_temporary_folder_is_removed_by_the_next_build(monkeypatch, tmp_path):
    """SIGKILL runs no cleanup: the next build, holding the lock (so no build is running), removes what it left."""
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path))
    target = tmp_path / "toy" / "thing"
    killed = tmp_path / "toy" / ".thing.a1b2c3"
    killed.mkdir(parents=True)
    (killed / "half.txt").write_text("half")
    build_once(target, lambda folder: (folder / "whole.txt").write_text("whole"), "a thing")
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]


BUILD_DATA = """
import sys
from lora_dpo.toy import cache
cache.toy_data_files()
"""


def test_processes_started_together_build_the_data_once_and_the_others_wait(tmp_path):
    env = {**os.environ, "LORA_DPO_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_DATA], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errs
    assert sum("writing the toy world's preference data" in e for e in errs) == 1, errs  # one build, once
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [f"data-{cache.world_key()}"]


# ------------------------------------------------------------------------------------------ the base model
def test_the_shipped_base_loads_and_speaks_the_world():
    """The base ships with the package (nothing to build): load it as a user would and sample reviews."""
    path = toy_model_path()
    assert path == build.BASE and (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in linears)  # 4-bit blocks of 64
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.eos_token_id

    rng = random.Random(0)
    prompts = [world.sample_prompt(rng) for _ in range(96)]
    tok.padding_side = "left"
    ids = [encode_prompt(tok, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long(), do_sample=True)
    new = out[:, width:]
    assert (new == tok.eos_token_id).any(dim=1).all()  # every sample ended its turn
    reviews = tok.batch_decode(new, skip_special_tokens=True)
    assert sum(map(world.is_grammatical, reviews)) >= 0.9 * len(reviews)  # measured: 0.97-0.99
    # The base is neutral. A review's share is ~0 or ~1 (its verdict decides), so the mean over 96 reviews has a
    # standard deviation of sqrt((2/9) / 96) = 0.048: 0.15 is 3 of them; a base that loved half the titles fails.
    assert sum(map(world.positive_share, reviews)) / len(reviews) == pytest.approx(1 / 3, abs=0.15)


def test_the_shipped_base_was_made_from_these_sources():
    """Whoever changes the world or its pre-training rebuilds the shipped base (python -m lora_dpo.toy build
    lora_dpo/toy/base), which records the sources' digest: a stale base fails here."""
    record = build.shipped_record()
    assert record["sources"] == build.source_digest(), "rebuild: python -m lora_dpo.toy build lora_dpo/toy/base"
    assert record["model_sha256"] == build.file_digest(build.BASE / "model.safetensors")


REBUILD = """
import sys, torch
torch.set_num_threads(4)  # the machine's thread count must not matter: the builder pre-trains on one thread
from lora_dpo.toy import build
print(build.build_base(__import__("pathlib").Path(sys.argv[1]))["model_sha256"])
"""


def test_the_builder_makes_the_shipped_base_bit_for_bit(tmp_path):
    """Its provenance: the builder, in a process set to 4 threads, makes exactly the shipped weights. Bits are a
    property of a torch build and a CPU's kernels: on another pair than the one recorded, there is nothing to
    compare (the demo still runs on the shipped weights there)."""
    record = build.shipped_record()
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if here != (record["torch"], record["cpu_capability"]):
        pytest.skip(f"the shipped base was built with torch {record['torch']} on {record['cpu_capability']}; "
                    f"this is torch {here[0]} on {here[1]}")
    out = subprocess.run([sys.executable, "-c", REBUILD, str(tmp_path / "base")], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == record["model_sha256"]


def test_the_data_command_on_the_toy_recipe_builds_no_model(monkeypatch, tmp_path):
    """`lora-dpo data recipes/toy.yaml` loads the tokenizer only: on an empty cache it writes the toy data and
    nothing else (the base ships with the package; before it did, this pre-trained a model)."""
    from lora_dpo.cli.data import inspect_data
    from lora_dpo.config import load_recipe
    from tiny import REPO

    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path))
    report = inspect_data(load_recipe(REPO / "recipes" / "toy.yaml"))
    assert report.train_pairs == cache.TRAIN_PAIRS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks", "toy"]
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [f"data-{cache.world_key()}"]
