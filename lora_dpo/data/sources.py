"""Where rows come from: a named source (names.py: the toy world registers `toy`), a local .json/.jsonl/.csv/.parquet
file or folder, a save_to_disk folder, or a Hub dataset id; one split of it, or the eval split a recipe names. A
recipe's data.subset / revision / data_dir / data_files choose what of data.train is read (datasets.load_dataset's
own arguments), and data.columns renames the dataset's columns to the ones lora-dpo reads."""

from __future__ import annotations

import re
from pathlib import Path

import datasets

from .. import names
from ..config import DataConfig
from ..errors import DataError, check_utf8, first_line

# local file suffix -> the `datasets` builder that reads it (json also reads a top-level JSON array)
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip"}  # datasets decompresses these itself: data.jsonl.gz
# suffixes that mark a string as a file path rather than a Hub id, so a missing one is reported as a file
_FILE_SUFFIXES = set(_BUILDERS) | _COMPRESSED | {".txt", ".tsv", ".arrow", ".xlsx", ".yaml", ".yml"}


class SplitError(DataError):
    """The source exists but has no such split."""


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSED:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def looks_like_path(source: str) -> bool:
    """A data or model name meant as a file or folder, rather than a named source or a Hub id."""
    # Hub ids are `name` or `owner/name`; anything else with a separator or a file suffix is meant as a path
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_SUFFIXES
    )


# recipe key -> datasets.load_dataset's argument
_OPTIONS = {"subset": "name", "revision": "revision", "data_dir": "data_dir", "data_files": "data_files"}


def load_options(cfg: DataConfig) -> dict:
    """data.train's datasets.load_dataset arguments that the recipe sets, by recipe key."""
    return {key: getattr(cfg, key) for key in _OPTIONS if getattr(cfg, key) is not None}


def _refuse(source: str, options: dict, what: str, keys=tuple(_OPTIONS)) -> None:
    """DataError when `options` sets any of `keys`: what they choose does not exist in `source`."""
    if named := [f"data.{k}" for k in keys if k in options]:
        raise DataError(f"{', '.join(named)}: data.train={source} is {what}, which has no subsets, revisions or parts "
                        "to choose; these keys apply to a Hub dataset (and but for data.revision to a local folder "
                        f"of data files): unset {' and '.join(named)}")


def _load_local(source: str, *args, **kwargs) -> "datasets.DatasetDict":
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # a parse error deep inside datasets; the user needs the file and the reason
        raise DataError(f"{source}: could not be read: {first_line(exc)}") from None


def _from_disk(source: str, path: Path) -> "datasets.DatasetDict":
    """A folder written by `Dataset.save_to_disk` (one split: `train`) or `DatasetDict.save_to_disk` (its splits)."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a folder save_to_disk did not finish, another datasets version's layout
        raise DataError(f"{source}: a save_to_disk folder that could not be read: {first_line(exc)}") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _open_local(source: str, options: dict) -> "datasets.DatasetDict | None":
    """Every split of a named source, a local file (split `train`) or folder; None for a Hub id. `options`: see
    load_options (a folder of data files takes all but revision; the others take none)."""
    if (files := names.lookup("data", source)) is not None:  # {split: local json file}
        _refuse(source, options, "a named source")
        return _load_local(source, "json", data_files=files())
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        _refuse(source, options, "a save_to_disk folder")
        return _from_disk(source, path)
    if path.is_dir():
        _refuse(source, options, "a local folder", ("revision",))
        return _load_local(source, str(path), **{_OPTIONS[k]: v for k, v in options.items()})
    if path.is_file():
        _refuse(source, options, "a file")
        suffix = _suffix(path)
        if suffix not in _BUILDERS:
            raise DataError(f"{source}: unsupported file type '{suffix}'; use .json, .jsonl, .csv or .parquet")
        if suffix != ".parquet" and _suffix(path) == path.suffix.lower():  # text, not compressed
            check_utf8(path, source, DataError)
        return _load_local(source, _BUILDERS[suffix], data_files=str(path))
    if looks_like_path(source):
        raise DataError(f"{source}: no such file or folder")
    return None


def load_split(source: str, splits: tuple[str, ...], options: dict | None = None) -> tuple["datasets.Dataset", str]:
    """The first of `splits` that `source` has, and its name. `options`: see load_options."""
    options = options or {}
    local = _open_local(source, options)
    if local is not None:
        for split in splits:
            if split in local:
                return local[split], split
        raise SplitError(f"{source}: no split '{splits[0]}'; available splits: {', '.join(local)}")
    for split in splits:
        try:
            return datasets.load_dataset(source, split=split, **{_OPTIONS[k]: v for k, v in options.items()}), split
        except ValueError as exc:
            # datasets says: Unknown split "x". Should be one of ['train', 'test'].
            if "Unknown split" not in str(exc):
                raise DataError(f"{source}: could not be loaded: {first_line(exc)}") from None
            found = re.search(r"one of \[(.*)\]", str(exc))
            available = found.group(1).replace("'", "") if found else "unknown"
            missing = SplitError(f"{source}: no split '{splits[0]}'; available splits: {available}")
        except Exception as exc:  # network, authentication, typo: one message, no traceback
            raise DataError(
                f"could not load dataset '{source}' from the Hugging Face Hub (offline? a typo in the id? "
                f"a local file that is not there?): {first_line(exc)}"
            ) from None
    raise missing


def load_rows(source: str, split: str, options: dict | None = None) -> "datasets.Dataset":
    """One split of a dataset: a named source, a local .json/.jsonl/.csv/.parquet file (its only split is
    `train`), a local folder, or a Hub dataset id. Raises DataError: missing file, unknown split (listing the
    available ones), a Hub dataset that cannot be loaded."""
    return load_split(source, (split,), options)[0]


def map_columns(rows: "datasets.Dataset", columns: dict[str, str], label: str, required: bool = True) -> "datasets.Dataset":
    """`rows` with the columns data.columns names renamed to lora-dpo's names ({ours: theirs}). A column that
    already has one of our names and is not the one mapped onto it is dropped: the mapping says which is meant.
    A mapped column the rows lack is an error naming the key, unless `required` is False and the rows have none
    of the mapped columns (an eval dataset in lora-dpo's own layout)."""
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    if not renames:
        return rows
    have = set(rows.column_names)
    missing = [(ours, theirs) for ours, theirs in columns.items() if theirs not in have]
    if missing and (required or len(missing) < len(columns)):
        ours, theirs = missing[0]
        raise DataError(f"data.columns.{ours}: {label} has no column '{theirs}'; its columns: "
                        f"{', '.join(rows.column_names)}")
    if missing:
        return rows
    replaced = [ours for ours, theirs in columns.items() if theirs != ours and ours in have and ours not in renames]
    return rows.remove_columns(replaced).rename_columns(renames)


def eval_is_split(name: str) -> bool:
    # a bare word is a split of data.train, even if a folder of that name exists here (write ./name for that);
    # a path, a file name, a named source or an owner/name Hub id is another dataset
    return names.lookup("data", name) is None and "/" not in name and not looks_like_path(name)


def train_rows(cfg: DataConfig) -> "datasets.Dataset":
    """The rows of data.train (its data.train_split), at most data.max_rows of them."""
    rows = map_columns(load_rows(cfg.train, cfg.train_split, load_options(cfg)), cfg.columns, cfg.train)
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        rows = rows.select(range(cfg.max_rows))
    return rows


def eval_rows(cfg: DataConfig) -> tuple["datasets.Dataset", str]:
    """(rows, label) of data.eval: a split of data.train, or another source read from its `test` split when it
    has one, else `train`. Call only when data.eval is set."""
    if eval_is_split(cfg.eval):
        label = f"{cfg.train} [{cfg.eval}]"
        try:
            rows = load_rows(cfg.train, cfg.eval, load_options(cfg))
        except SplitError as exc:
            raise DataError(f"data.eval={cfg.eval} names a split of data.train that it lacks: {exc}; set data.eval "
                            "to a file or dataset, or to null to hold out data.eval_fraction of data.train") from None
        return map_columns(rows, cfg.columns, label), label
    rows, split = load_split(cfg.eval, ("test", "train"))
    label = f"{cfg.eval} [{split}]"
    return map_columns(rows, cfg.columns, label, required=False), label
