from __future__ import annotations

import dataclasses

import pytest
import yaml

from vae_cli.core import recipe as R
from vae_cli.core.errors import RecipeError

from .conftest import ROOT


def test_defaults_are_valid_and_frozen():
    r = R.load(None)
    assert r.model.name == "vae" and r.train.epochs >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.epochs = 3  # frozen


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = R.load(path)
    assert r.name == (yaml.safe_load(path.read_text()).get("name") or path.stem)


def test_dotted_and_bare_overrides():
    r = R.load(None, ["model.latent_dim=32", "epochs=7", "lr=1e-4", "data.labels_per_class=null", "seed=3"])
    assert (r.model.latent_dim, r.train.epochs, r.train.lr, r.seed) == (32, 7, 1e-4, 3)
    assert r.data.labels_per_class is None


def test_yaml_exponent_float_in_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 3e-4\n")  # YAML 1.1 reads this as a string; we accept it as a float
    assert R.load(p).train.lr == pytest.approx(3e-4)
    assert R.load(p).name == "r"


@pytest.mark.parametrize("overrides, message", [
    (["model.latnt_dim=3"], "unknown recipe key 'model.latnt_dim'; did you mean 'model.latent_dim'?"),
    (["ephocs=3"], "did you mean 'train.epochs'?"),
    (["train.epochs=abc"], "recipe key 'train.epochs' must be an int, got 'abc'"),
    (["train.epochs=2.5"], "recipe key 'train.epochs' must be an int"),
    (["train.epochs=0"], "recipe key 'train.epochs' must be >= 1, got 0"),
    (["train.precision=fp8"], "recipe key 'train.precision' must be one of auto, fp32, bf16, fp16"),
    (["model.likelihood=poisson"], "must be one of bernoulli, gaussian"),
    (["train.lr=0"], "recipe key 'train.lr' must be > 0.0"),
    (["data.download=maybe"], "recipe key 'data.download' must be a bool"),
    (["model.latent_dim=null"], "recipe key 'model.latent_dim' must be an int, not null"),
    (["latent_dim"], "is not key=value"),
    (["data.labels_per_class=5", "data.labeled_fraction=0.1"], "set only one of"),
    (["data=3"], "'data' is a section; override its keys one by one"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(RecipeError) as e:
        R.load(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("model: [1, 2", "is not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping"),
    ("model:\n  latent: 3\n", "unknown recipe key 'model.latent'; did you mean 'model.latent_dim'?"),
    ("modle:\n  latent_dim: 3\n", "unknown recipe key 'modle'; did you mean 'model'"),
    ("train:\n  epochs: '5'\n", "must be an int"),
])
def test_bad_files(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        R.load(p)
    assert message in str(e.value)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        R.load(tmp_path / "nope.yaml")


def test_defaults_yaml_round_trips_and_documents_every_key():
    text = R.defaults_yaml()
    parsed = yaml.safe_load(text)
    assert R.from_dict(parsed) == R.Recipe()
    for k in R.all_keys():
        assert f"{k.split('.')[-1]}:" in text
    assert text.count("#") >= len(R.all_keys())


def test_replace_validates():
    r = R.Recipe().replace(**{"train.epochs": 2})
    assert r.train.epochs == 2
    with pytest.raises(RecipeError):
        R.Recipe().replace(**{"train.epochs": -1})


def test_hidden_is_refused_where_no_chosen_network_has_a_hidden_layer():
    """#32: the resnet encoder ends in global pooling and the deep decoder starts from its feature map, so
    model.hidden sizes nothing with both: refused, naming them. With either net that has one, it is read."""
    from vae_cli.core import recipe as R
    from vae_cli.core.errors import RecipeError

    with pytest.raises(RecipeError, match="neither the resnet encoder nor the deep decoder"):
        R.load(None, ["model.backbone=resnet", "model.decoder=deep", "model.hidden=128"])
    R.load(None, ["model.backbone=resnet", "model.decoder=deep"])  # the default value: nothing to refuse
    R.load(None, ["model.backbone=resnet", "model.decoder=mlp", "model.hidden=128"])
    R.load(None, ["model.name=m2", "model.backbone=resnet", "model.decoder=deep", "model.hidden=64"])  # M2's z head


def test_head_steps_is_refused_for_models_that_train_their_classifier_in_the_loop():
    """train.head_steps drives the classifier stage after the loop (the M1 head of vae, iwae, hvae); M2-style
    models have none, so a value other than 0 or the default would be silently ignored: refused."""
    from vae_cli.core import recipe as R
    from vae_cli.core.errors import RecipeError

    for name in ("m2", "m2h", "m1m2"):
        with pytest.raises(RecipeError, match=f"model '{name}' .* does not read train.head_steps"):
            R.load(None, [f"model.name={name}", "train.head_steps=100"])
        R.load(None, [f"model.name={name}", "train.head_steps=0"])  # says what the model does anyway
    for name in ("vae", "iwae", "hvae"):
        assert R.load(None, [f"model.name={name}", "train.head_steps=100"]).train.head_steps == 100
