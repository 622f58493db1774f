"""Recipes: YAML files naming one locate -> steer -> improve loop, and the runner that executes them."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).parent / "bundled"


def list_recipes() -> list[str]:
    """Names of the recipes shipped with mechanic (file stems under recipes/bundled)."""
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: an existing path, or the bundled recipe of that name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if (BUNDLED / f"{name_or_path}.yaml").is_file():
        return BUNDLED / f"{name_or_path}.yaml"
    from mechanic.recipes.schema import RecipeError
    raise RecipeError(f"No recipe file {name_or_path!r} and no bundled recipe of that name. Bundled recipes: "
                      f"{', '.join(list_recipes())}; or give the path of your own .yaml file.")
