"""YAML for recipes, read with `yaml.safe_load` only (no custom Loader, nothing constructed but plain
data), after checks on the node tree that safe_load does not make: anchors/aliases (a "billion laughs"
document expands exponentially) and duplicate keys (the last would silently win)."""

from __future__ import annotations

import yaml


def safe_yaml(text: str):
    """yaml.safe_load, stricter: anchors/aliases are refused (a recipe never needs them, and nested aliases
    expand exponentially) and a key given twice is an error, not silently the last one. The checks read
    the event stream and the node tree (no construction), then yaml.safe_load builds the values."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.constructor.ConstructorError(None, None, "anchors and aliases (*name) are not allowed in a "
                                                    "recipe; write the values out", event.start_mark)
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]  # no aliases: a tree, walked once
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            for k_node, _ in node.value:
                if isinstance(k_node, yaml.ScalarNode) and keys.count(k_node.value) > 1:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{k_node.value[:60]}' appears twice; "
                                                            f"keep one", k_node.start_mark)
            stack += [v for _, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    return yaml.safe_load(text)
