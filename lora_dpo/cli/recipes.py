"""`lora-dpo recipes`: the recipes that ship with lora-dpo, with the header each starts with."""

from __future__ import annotations

import shutil
import textwrap

from ..paths import shipped_recipes


def header(path) -> dict[str, str]:
    """The recipe's header comments ("# GPU: ...", "# Model: ...", continued on indented "#" lines) by field."""
    fields, last = {}, None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        field, sep, value = text.partition(":")
        if sep and field.isalpha() and field[:1].isupper() and line[1:2] == " " and not line[2:3].isspace():
            fields[field], last = value.strip(), field
        elif last:
            fields[last] += " " + text
    return fields


def run(args) -> int:
    recipes = shipped_recipes()
    width = max(len(p.stem) for p in recipes)
    columns = max(60, shutil.get_terminal_size().columns - 1)
    indent = " " * (width + 2)
    for path in recipes:
        fields = header(path)
        lines = [f"gpu: {fields.get('GPU', '?')}"] + [f"{f.lower()}: {fields[f]}" for f in ("Model", "Shows") if f in fields]
        for i, line in enumerate(lines):
            first = f"{path.stem:<{width}}  " if i == 0 else indent
            print(textwrap.fill(line, columns, initial_indent=first, subsequent_indent=indent + "  "))
    print(f"\ntrain one by its name from any folder (its run goes to ./runs/): lora-dpo train {recipes[0].stem}; "
          f"the files are in {recipes[0].parent}")
    return 0
