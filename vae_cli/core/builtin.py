"""The recipes shipped inside the package (vae_cli/recipes/*.yaml), usable by name from any folder after
a plain `pip install`: `vae train digits` is `vae train <site-packages>/vae_cli/recipes/digits.yaml`.
The repository's top-level `recipes/` is a link to the same folder."""

from __future__ import annotations

from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def path_of(name: str) -> Path | None:
    """The shipped recipe called `name` (with or without .yaml), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    p = RECIPES / f"{stem}.yaml"
    return p if "/" not in stem and "\\" not in stem and p.is_file() else None


def resolve(arg: str | Path) -> Path:
    """A recipe argument -> the file to read: an existing path wins, then a shipped recipe's name. A name
    that is neither is left as a path, so the loader's 'not found' message names it."""
    p = Path(arg)
    if p.is_file():
        return p
    return path_of(str(arg)) or p


def summary(name: str) -> str:
    """The first comment line of a shipped recipe: what it reaches and how long it takes."""
    for line in path_of(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
