"""Hypothesis fuzz: no recipe file and no override string may produce anything but a RecipeError."""

from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vae_cli.core import recipe as R
from vae_cli.core.errors import RecipeError

KEYS = R.all_keys() + [k.split(".")[-1] for k in R.all_keys()] + list(R.SECTIONS)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))
keys = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters + "._", max_size=15))
recipes = st.recursive(scalars, lambda inner: st.dictionaries(keys, inner, max_size=6), max_leaves=20)
override_text = st.text(string.printable, max_size=40)
overrides = st.one_of(override_text,
                      st.tuples(st.sampled_from(KEYS), override_text).map(lambda kv: f"{kv[0]}={kv[1]}"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=recipes)
def test_any_recipe_structure_is_accepted_or_rejected_cleanly(raw):
    try:
        r = R.from_dict(raw)
    except RecipeError as e:
        assert "\n" not in str(e)
    else:
        assert R.from_dict(r.to_dict()) == r


@settings(max_examples=300, deadline=None)
@given(items=st.lists(overrides, max_size=4))
def test_any_override_strings_are_accepted_or_rejected_cleanly(items):
    try:
        r = R.load(None, items)
    except RecipeError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(r, R.Recipe)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_recipe_text_is_accepted_or_rejected_cleanly(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        R.load(p)
    except RecipeError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(raw=st.dictionaries(st.sampled_from(list(R.SECTIONS)),
                           st.dictionaries(st.sampled_from([k.split(".")[-1] for k in R.all_keys()]), scalars,
                                           max_size=5), max_size=3))
def test_known_keys_with_random_values(raw):
    text = yaml.safe_dump(raw)
    try:
        R.from_dict(yaml.safe_load(text))
    except RecipeError as e:
        assert "\n" not in str(e)
