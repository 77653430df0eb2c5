"""Recipes: YAML + dotted overrides, strict validation naming the dotted key, the resolved recipe saved."""

import textwrap

import pytest
import yaml

from lora_dpo.config import Recipe, load_recipe, parse_overrides, save_recipe
from lora_dpo.errors import ConfigError

MINIMAL = "output_dir: runs/x\nmodel:\n  name: some/model\ndata:\n  train: pairs.jsonl\n"


@pytest.fixture
def recipe_file(tmp_path):
    def write(text=MINIMAL):
        path = tmp_path / "r.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def test_minimal_recipe_fills_defaults(recipe_file):
    r = load_recipe(recipe_file())
    assert isinstance(r, Recipe)
    assert (r.model.name, r.data.train, r.loss.beta, r.lora.target_modules) == ("some/model", "pairs.jsonl", 0.1, "all-linear")


def test_dotted_overrides_are_typed_from_yaml(recipe_file):
    r = load_recipe(recipe_file(), ["train.lr=1e-4", "loss.beta=0.5", "train.batch_size=2",
                                    "model.quantization=none", "lora.target_modules=[q_proj,v_proj]",
                                    "data.max_prompt_length=null", "overwrite=true"])
    assert r.train.lr == pytest.approx(1e-4)
    assert r.loss.beta == 0.5 and r.train.batch_size == 2 and r.model.quantization == "none"
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.overwrite is True


def test_yaml_scientific_floats_read_as_numbers(recipe_file):
    r = load_recipe(recipe_file(MINIMAL + "train:\n  lr: 5e-5\n"))
    assert r.train.lr == pytest.approx(5e-5)


def test_unknown_key_suggests_nearest_valid_key(recipe_file):
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rte'.*"):
        load_recipe(recipe_file(), ["train.learning_rte=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'loss.bta'; did you mean 'loss.beta'\?"):
        load_recipe(recipe_file(), ["loss.bta=0.2"])
    with pytest.raises(ConfigError, match=r"unknown key 'lorra'; did you mean 'lora'\?"):
        load_recipe(recipe_file(MINIMAL + "lorra:\n  r: 8\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.beta=0", r"loss.beta: must be > 0, got 0"),
        ("loss.beta=-1", r"loss.beta: must be > 0"),
        ("train.lr=0", r"train.lr: must be > 0"),
        ("data.max_length=1", r"data.max_length: must be >= 2, got 1"),
        ("lora.r=0", r"lora.r: must be >= 1"),
        ("loss.label_smoothing=0.5", r"loss.label_smoothing: must be in \[0, 0.5\)"),
        ("train.batch_size=two", r"train.batch_size: expected an integer, got 'two'"),
        ("train.batch_size=2.5", r"train.batch_size: expected an integer, got 2.5"),
        ("model.gradient_checkpointing=maybe", r"model.gradient_checkpointing: expected true or false or one of 'auto'"),
        ("loss.name=dpoo", r"loss.name: expected one of 'dpo', 'ipo', 'hinge', 'robust', 'simpo', 'orpo', 'kto', got 'dpoo'"),
        ("data.on_bad_rows=ignore", r"data.on_bad_rows: expected one of 'error', 'skip'"),
        ("train.warmup_ratio=1", r"train.warmup_ratio: must be in \[0, 1\)"),
    ],
)
def test_bad_values_name_the_dotted_key(recipe_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe_file(), [override])


@pytest.mark.parametrize("missing, key", [("model:\n  name: m\n", "data.train"), ("data:\n  train: t\n", "model.name")])
def test_missing_required_key_is_named(recipe_file, missing, key):
    with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
        load_recipe(recipe_file("output_dir: o\n" + missing))


def test_missing_output_dir_is_named(recipe_file):
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        load_recipe(recipe_file("model:\n  name: m\ndata:\n  train: t\n"))


def test_section_given_a_scalar_is_an_error(recipe_file):
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_recipe(recipe_file("output_dir: o\nmodel: llama\n"))


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_saved_recipe_reloads_to_the_same_recipe(recipe_file, tmp_path):
    r = load_recipe(recipe_file(), ["train.lr=2e-4", "lora.target_modules=[q_proj]"])
    save_recipe(r, tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml") == r
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == pytest.approx(2e-4)


def test_yaml_no_is_the_word_where_a_choice_expects_it(tmp_path):
    """YAML 1.1 reads `no` as false: `train.mixed_precision=no` (and `mixed_precision: no` in a file) mean "no"."""
    assert load_recipe(None, [f"output_dir={tmp_path}", "model.name=toy", "data.train=toy",
                              "train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\nmodel: {name: toy}\ndata: {train: toy}\ntrain: {mixed_precision: no}\n")
    assert load_recipe(path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.optimizer: expected one of"):
        load_recipe(path, ["train.optimizer=no"])  # a choice without "no" still refuses a boolean


def test_overrides_leave_the_base_tree_they_start_from_untouched():
    base = {"output_dir": "x", "model": {"name": "toy"}, "data": {"train": "x"}, "train": {"batch_size": 2}}
    first = load_recipe(None, ["train.shared_prompt=false", "train.batch_size=8"], base=base)
    second = load_recipe(None, [], base=base)
    assert (first.train.shared_prompt, first.train.batch_size) == (False, 8)
    assert (second.train.shared_prompt, second.train.batch_size) == ("auto", 2)
    assert base["train"] == {"batch_size": 2}


def test_a_string_key_keeps_what_was_written_and_a_number_key_reads_5e_5(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: runs/x\nmodel:\n  name: toy\n  revision: 8e01234\ndata:\n  train: toy\n"
                    "  system_prompt: 1e3\ntrain:\n  lr: 5e-5\n")
    recipe = load_recipe(path)
    assert recipe.model.revision == "8e01234"  # a pinned short commit, not inf
    assert recipe.data.system_prompt == "1e3" and recipe.train.lr == 5e-5
    over = load_recipe(path, ["model.revision=1e5", "data.system_prompt=2E3", "train.lr=1e-4", "loss.beta=.5"])
    assert (over.model.revision, over.data.system_prompt) == ("1e5", "2E3")
    assert (over.train.lr, over.loss.beta) == (1e-4, 0.5)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got '1e-4x'"):
        load_recipe(path, ["train.lr=1e-4x"])


@pytest.mark.parametrize("override, said", [
    ("train.eval_steps=5", "unknown key 'train.eval_steps'; eval_steps (TRL) is train.eval_every here"),
    ("train.save_steps=5", "save_steps (TRL) is train.save_every here"),
    ("train.learning_rate=1e-4", "learning_rate (TRL) is train.lr here"),
    ("gradient_accumulation_steps=4", "gradient_accumulation_steps (TRL, LLaMA-Factory, torchtune) is train.grad_accum"),
    ("train.save_total_limit=2", "save_total_limit (TRL) is train.keep_last here"),
    ("lora.lora_rank=8", "lora_rank (LLaMA-Factory, torchtune) is lora.r here"),
    ("max_steps=5", "unknown key 'max_steps'; it is train.max_steps"),
    ("data.beta=0.2", "it is loss.beta"),
    ("train.max_lenght=64", "did you mean 'data.max_length'?"),  # the nearest key of any section
    ("train.epoch=2", "did you mean 'train.epochs'?"),
])
def test_names_users_bring_are_answered_with_the_recipe_key(override, said):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["output_dir=runs/x", "model.name=toy", "data.train=toy", override])
    assert said in str(err.value)


def test_every_foreign_name_points_at_a_recipe_key():
    from lora_dpo.config.load import recipe_keys
    from lora_dpo.config.names import FOREIGN_NAMES

    keys = set(recipe_keys())
    assert all(target in keys for target, _ in FOREIGN_NAMES.values())
    assert not keys & {f"train.{n}" for n in FOREIGN_NAMES} - {"train.seed", "train.epochs", "train.lr"}
