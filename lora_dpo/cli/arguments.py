"""Arguments shared by the commands that read a recipe."""

from __future__ import annotations


def add_recipe_arguments(parser, where: str | None, example: str) -> None:
    """The two positional arguments of every command that reads a recipe: its path and dotted overrides."""
    parser.add_argument("recipe", help=f"path to a YAML recipe ({where})" if where else "path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")
