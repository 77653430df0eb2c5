"""Datasets the usual way (#18): data.columns maps a dataset's own column names (Intel/orca's, argilla's) onto the
ones lora-dpo reads; data.subset, revision, data_dir and data_files choose what of data.train is read, as
datasets.load_dataset's own arguments; a `system` column is the row's system prompt in every layout."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import datasets
import pytest

from lora_dpo.cli.main import main
from lora_dpo.config import DataConfig
from lora_dpo.config.load import load_recipe
from lora_dpo.data.examples import build_completion_datasets
from lora_dpo.data.pairs import build_datasets
from lora_dpo.data.sources import load_options, load_rows
from lora_dpo.errors import ConfigError, DataError

ORCA = [  # Intel/orca_dpo_pairs
    {"system": "You are terse.", "question": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": "No idea."}
    for i in range(6)
]
ARGILLA = [  # argilla/ultrafeedback-binarized-preferences
    {"source": "evol", "instruction": f"Name colour {i}.", "chosen_response": "Blue.", "chosen_avg_rating": 4.5,
     "rejected_response": "Cats.", "rejected_avg_rating": 1.0}
    for i in range(6)
]
ORCA_COLUMNS = {"prompt": "question"}
ARGILLA_COLUMNS = {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(cfg: DataConfig, tok) -> list:
    return build_datasets(cfg, tok, seed=0)[0]


def test_an_orca_layout_reads_with_a_column_mapping_and_keeps_its_system_column(tmp_path, tok_chatml):
    data = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    got = pairs(DataConfig(train=str(data), eval_fraction=0.0, columns=ORCA_COLUMNS), tok_chatml)
    assert len(got) == 6
    assert got[0].prompt == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 0 + 1?"}]
    # the row's own system prompt wins over data.system_prompt; a row without one gets data.system_prompt
    rows = ORCA[:3] + [{**r, "system": ""} for r in ORCA[3:]]
    got = pairs(DataConfig(train=str(write_jsonl(tmp_path / "o2.jsonl", rows)), eval_fraction=0.0,
                           columns=ORCA_COLUMNS, system_prompt="Be kind."), tok_chatml)
    assert [p.prompt[0]["content"] for p in got] == ["You are terse."] * 3 + ["Be kind."] * 3


def test_an_argilla_layout_reads_with_a_column_mapping(tmp_path, tok_chatml):
    data = write_jsonl(tmp_path / "argilla.jsonl", ARGILLA)
    with pytest.raises(DataError, match="no known preference format fits the columns found: source, instruction"):
        pairs(DataConfig(train=str(data), eval_fraction=0.0), tok_chatml)
    got = pairs(DataConfig(train=str(data), eval_fraction=0.0, columns=ARGILLA_COLUMNS), tok_chatml)
    assert len(got) == 6 and got[2].prompt == "Name colour 2."
    assert tok_chatml.decode(got[2].chosen_ids).startswith("Blue.")
    assert tok_chatml.decode(got[2].rejected_ids).startswith("Cats.")


@pytest.mark.parametrize("layout", ["orca", "argilla"])
def test_orca_and_argilla_files_train_from_the_command_line(layout, tmp_path, tiny_llama, capsys):
    rows, columns = (ORCA, ORCA_COLUMNS) if layout == "orca" else (ARGILLA, ARGILLA_COLUMNS)
    data = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  name: {tiny_llama}\ndata:\n  train: {data}\n"
                      f"  max_length: 32\n  eval_fraction: 0.3\n  columns: {json.dumps(columns)}\n"
                      "train:\n  max_steps: 2\n  batch_size: 2\n")
    assert main(["train", str(recipe)]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    # one key of the mapping from the command line, as users try a layout
    assert main(["train", str(recipe), "data.columns.prompt=query", "overwrite=true"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-dpo: error:")]
    assert len(error) == 1 and "data.columns.prompt" in error[0] and "has no column 'query'; its columns:" in error[0]


def test_a_mapped_column_that_is_not_there_is_named_with_the_columns_found(tmp_path, tok_chatml):
    data = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    with pytest.raises(DataError, match=r"data.columns.prompt: .*orca.jsonl has no column 'instruction'; its columns: "
                                        r"system, question, chosen, rejected"):
        pairs(DataConfig(train=str(data), eval_fraction=0.0, columns={"prompt": "instruction"}), tok_chatml)


def test_a_mapping_chooses_between_two_candidate_columns_and_may_swap(tmp_path, tok_chatml):
    rows = [{"prompt": "draft", "question": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    got = pairs(DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.0,
                           columns={"prompt": "question"}), tok_chatml)
    assert [p.prompt for p in got] == ["q0", "q1", "q2"]  # the mapped column, not the one already named prompt
    swapped = pairs(DataConfig(train=str(tmp_path / "d.jsonl"), eval_fraction=0.0,
                               columns={"chosen": "rejected", "rejected": "chosen"}), tok_chatml)
    assert tok_chatml.decode(swapped[0].chosen_ids).startswith("b")


def test_a_mapping_that_names_a_column_as_it_is_keeps_it(tmp_path, tok_chatml):
    """LLaMA-Factory's dataset_info habit: {prompt: instruction, chosen: chosen, rejected: rejected}."""
    rows = [{"instruction": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    got = pairs(DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.0,
                           columns={"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}), tok_chatml)
    assert [p.prompt for p in got] == ["q0", "q1", "q2"] and tok_chatml.decode(got[0].chosen_ids).startswith("a")


def test_the_mapping_is_checked_when_the_recipe_is_read():
    with pytest.raises(ConfigError, match="data.columns.question: not a column lora-dpo reads.*data.columns.prompt=question"):
        DataConfig(train="x.jsonl", columns={"question": "prompt"})
    with pytest.raises(ConfigError, match="the column 'q' is mapped onto prompt and system"):
        DataConfig(train="x.jsonl", columns={"prompt": "q", "system": "q"})
    with pytest.raises(ConfigError, match="data.columns: expected a mapping of a string to a string"):
        DataConfig(train="x.jsonl", columns="prompt=question")
    with pytest.raises(ConfigError, match="data.columns: cannot be empty"):
        DataConfig(train="x.jsonl", columns={"prompt": " "})


def test_the_mapping_and_dataset_keys_come_from_yaml_and_overrides(tmp_path):
    recipe = load_recipe(None, ["output_dir=o", "model.name=m", "data.train=t", "data.columns.prompt=question",
                                "data.columns={chosen: chosen_response}", "data.subset=en", "data.revision=8e01234",
                                "data.data_files=[a.jsonl, b.jsonl]"])
    # a whole mapping replaces the one before it, as any value does
    assert recipe.data.columns == {"chosen": "chosen_response"}
    assert load_options(recipe.data) == {"subset": "en", "revision": "8e01234", "data_files": ["a.jsonl", "b.jsonl"]}
    with pytest.raises(ConfigError, match="dataset_config \\(TRL\\) is data.subset here"):
        load_recipe(None, ["output_dir=o", "model.name=m", "data.train=t", "data.dataset_config=en"])


def test_the_eval_source_is_mapped_when_it_has_the_mapped_columns_and_left_alone_in_lora_dpos_own_layout(tmp_path, tok_chatml):
    train = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    _, evals, _ = build_datasets(DataConfig(train=str(train), eval=str(own), columns=ORCA_COLUMNS), tok_chatml, 0)
    assert [e.prompt for e in evals] == ["p"]
    orca_eval = write_jsonl(tmp_path / "orca_eval.jsonl", ORCA[:2])
    _, evals, _ = build_datasets(DataConfig(train=str(train), eval=str(orca_eval), columns=ORCA_COLUMNS), tok_chatml, 0)
    assert evals[1].prompt[1]["content"] == "What is 1 + 1?"
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"sys" if k == "system" else k: v for k, v in r.items()} for r in ORCA])
    half = write_jsonl(tmp_path / "half.jsonl", [{"question": "q", "chosen": "a", "rejected": "b", "prompt": "p"}])
    cfg = DataConfig(train=str(renamed), eval=str(half), columns={"prompt": "question", "system": "sys"})
    with pytest.raises(DataError, match="data.columns.system: .*half.jsonl \\[train\\] has no column 'sys'"):
        build_datasets(cfg, tok_chatml, 0)


def test_kto_and_sft_data_take_the_same_keys(tmp_path, tok_chatml):
    rows = [{"query": f"q{i}", "response": f"r{i}", "thumbs_up": i % 2 == 0} for i in range(6)]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "fb.jsonl", rows)), eval_fraction=0.0,
                     columns={"prompt": "query", "completion": "response", "label": "thumbs_up"})
    train, _, _ = build_completion_datasets(cfg, tok_chatml, 0, labelled=True)
    assert [e.desirable for e in train] == [True, False] * 3
    sft, _, _ = build_completion_datasets(cfg, tok_chatml, 0, labelled=False)
    assert len(sft) == 3  # SFT keeps the desirable examples


def _folder_with_configs(tmp_path) -> Path:
    """A local dataset folder whose README.md declares two configurations, as Hub datasets do."""
    root = tmp_path / "ds"
    for name, text in (("en", "hello"), ("fr", "bonjour")):
        (root / name).mkdir(parents=True)
        write_jsonl(root / name / "train.jsonl", [{"prompt": text, "chosen": "a", "rejected": "b"}] * 2)
        write_jsonl(root / name / "extra.jsonl", [{"prompt": text + "!", "chosen": "a", "rejected": "b"}])
    (root / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: en
          data_files: en/train.jsonl
        - config_name: fr
          data_files: fr/train.jsonl
        ---
        """))
    return root


def test_subset_data_dir_and_data_files_choose_within_a_folder(tmp_path):
    root = _folder_with_configs(tmp_path)
    assert load_rows(str(root), "train", {"subset": "fr"})["prompt"] == ["bonjour"] * 2
    assert load_rows(str(root), "train", {"data_files": "en/extra.jsonl"})["prompt"] == ["hello!"]
    assert load_rows(str(root), "train", {"data_dir": "fr", "data_files": "extra.jsonl"})["prompt"] == ["bonjour!"]
    with pytest.raises(DataError, match="could not be read"):
        load_rows(str(root), "train", {"subset": "de"})


def test_a_choice_that_the_source_cannot_have_is_refused_naming_the_key(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ORCA)
    with pytest.raises(DataError, match="data.subset: data.train=.*d.jsonl is a file.*unset data.subset"):
        load_rows(str(data), "train", {"subset": "en"})
    with pytest.raises(DataError, match="data.revision: data.train=.* is a local folder"):
        load_rows(str(_folder_with_configs(tmp_path)), "train", {"revision": "main"})
    datasets.Dataset.from_list(ORCA).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="data.data_dir: .* is a save_to_disk folder"):
        load_rows(str(tmp_path / "saved"), "train", {"data_dir": "x"})


def test_a_hub_dataset_gets_the_choices_as_load_datasets_arguments(monkeypatch, tok_chatml):
    calls = []

    def fake_load_dataset(path, **kwargs):  # the Hub cannot be reached here: record what would be asked of it
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(ORCA)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(train="Intel/orca_dpo_pairs", eval_fraction=0.0, subset="default", revision="8e01234",
                     data_dir="data", data_files=["train-*.parquet"], columns=ORCA_COLUMNS)
    assert len(pairs(cfg, tok_chatml)) == 6
    assert calls == [("Intel/orca_dpo_pairs", {"split": "train", "name": "default", "revision": "8e01234",
                                               "data_dir": "data", "data_files": ["train-*.parquet"]})]
