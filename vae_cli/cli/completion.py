"""Shell completion (`vae --install-completion` for bash, zsh, fish, PowerShell): shipped recipe names and
.yaml files after `vae train`, then recipe keys (`model.latent_dim=`) and, after the `=`, a key's choices
or registered names. No torch here: completion runs on every Tab."""

from __future__ import annotations

import glob
import os


def complete_recipe(incomplete: str) -> list[tuple[str, str]]:
    from vae_cli.core import builtin

    out = [(n, builtin.summary(n)[:70]) for n in builtin.names() if n.startswith(incomplete)]
    files = glob.glob(os.path.expanduser(incomplete) + "*")
    out += [(f + ("/" if os.path.isdir(f) else ""), "") for f in sorted(files)
            if os.path.isdir(f) or f.endswith((".yaml", ".yml"))]
    return out


def complete_override(incomplete: str) -> list[tuple[str, str]]:
    from vae_cli.core import recipe

    if "=" in incomplete:
        key, _, value = incomplete.partition("=")
        try:
            dotted = recipe.resolve_key(key)
        except Exception:  # noqa: BLE001  (an unknown key: nothing to offer)
            return []
        return [(f"{key}={v}", "") for v in key_values(dotted) if v.startswith(value)]
    return [(f"{d}=", recipe.field_of(d).metadata["help"][:70]) for d in recipe.all_keys() if d.startswith(incomplete)]


def key_values(dotted: str) -> list[str]:
    """The values a key can take where they are a closed set (registered names, choices, booleans)."""
    from vae_cli.core import recipe
    from vae_cli.core.recipe_values import registry_of

    f = recipe.field_of(dotted)
    if f.metadata["registry"]:
        return registry_of(f.metadata["registry"]).names()
    if f.metadata["choices"]:
        return [str(c) for c in f.metadata["choices"]]
    return ["true", "false"] if isinstance(f.default, bool) else []
