"""Config files, locked fields, command-line overrides and their one-line errors."""

import glob
import os

import pytest

from jaxssl import configuration
from jaxssl.configuration import ConfigError

CONFIG_FILES = sorted(glob.glob(os.path.join(configuration.CONFIG_DIR, "*.py")))


def test_the_three_configs_exist():
    names = {os.path.basename(f) for f in CONFIG_FILES}
    assert {"demo.py", "simclr_cifar10.py", "simclr_imagenet.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_validates_and_documents_its_command(path):
    module_doc = open(path).read().split('"""')[1]
    assert "jaxssl train --config configs/" + os.path.basename(path) in module_doc
    assert "xpected" in module_doc  # the result it is expected to reach
    config = configuration.load_config(path)
    if config.data.source in ("folder", "cifar10_npz", "records") and not config.data.path:
        configuration.apply_overrides(config, [("data.path", "/data/x")])
    configuration.validate(config)
    assert set(configuration.flat_fields(config)) == set(
        configuration.flat_fields(configuration.default_config()))
    with pytest.raises(AttributeError):  # locked: no new fields
        config.batch_sise = 3


def test_literature_settings_of_the_big_configs():
    cifar = configuration.load_config("simclr_cifar10")
    assert (cifar.model.encoder, cifar.model.cifar_stem, cifar.batch_size) == ("resnet18", True, 512)
    assert cifar.optim.name == "lars" and cifar.num_epochs == 1000
    assert cifar.loss.temperature in (0.2, 0.5)
    imagenet = configuration.load_config("simclr_imagenet")
    assert (imagenet.model.encoder, imagenet.batch_size, imagenet.model.bn) == ("resnet50", 4096, "global")
    assert (imagenet.optim.name, imagenet.optim.base_lr, imagenet.optim.lr_scaling) == ("lars", 0.3, "linear")
    assert (imagenet.optim.warmup_epochs, imagenet.loss.temperature) == (10.0, 0.1)
    assert configuration.load_config("simclr_imagenet:1000").num_epochs == 1000


def test_bare_name_and_path_load_the_same_file():
    a = configuration.load_config("demo")
    b = configuration.load_config(os.path.join(configuration.CONFIG_DIR, "demo.py"))
    assert a.to_dict() == b.to_dict()


def test_overrides_are_typed_by_the_field():
    c = configuration.load_config("demo")
    configuration.apply_overrides(c, [
        ("batch_size", "64"), ("num_steps", "7"), ("optim.base_lr", "1"),
        ("optim.weight_decay", "1e-4"), ("model.head_hidden_dims", "(32, 16)"),
        ("model.zero_init_last_bn", "true"), ("data.augment", "host"), ("data.name", "1e-3")])
    assert c.batch_size == 64 and c.num_steps == 7
    assert c.optim.base_lr == 1.0 and isinstance(c.optim.base_lr, float)
    assert c.optim.weight_decay == 1e-4
    assert c.model.head_hidden_dims == (32, 16)
    assert c.model.zero_init_last_bn is True
    assert c.data.augment == "host" and c.data.name == "1e-3"  # strings stay strings
    configuration.apply_overrides(c, [("model.head_hidden_dims", "64")])
    assert c.model.head_hidden_dims == (64,)


@pytest.mark.parametrize("name, raw, expected", [
    ("batch_sise", "8", "unknown config field 'batch_sise'; did you mean 'batch_size'?"),
    ("optim.lr", "0.1", "'optim.base_lr'"),
    ("optim", "3", "unknown config group, not a field 'optim'"),
    ("batch_size", "abc", "config field batch_size wants int; got 'abc'"),
    ("batch_size", "1.5", "config field batch_size wants int"),
    ("model.cifar_stem", "maybe", "config field model.cifar_stem wants true or false"),
])
def test_bad_overrides_say_what_to_change_in_one_line(name, raw, expected):
    c = configuration.load_config("demo")
    with pytest.raises(ConfigError) as e:
        configuration.apply_overrides(c, [(name, raw)])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, raw, expected", [
    ("data.source", "imagenet", "unknown data.source 'imagenet'"),
    ("data.source", "buildin", "did you mean 'builtin'?"),
    ("data.augment", "gpu", "unknown data.augment 'gpu'"),
    ("model.encoder", "resnet20", "'resnet50'"),
    ("optim.name", "lamb", "unknown optim.name 'lamb'"),
    ("batch_size", "0", "batch_size must be positive"),
    ("loss.temperature", "0", "loss.temperature must be positive"),
    ("log_every_steps", "0", "log_every_steps must be positive"),
])
def test_validate_rejects_values_the_trainer_cannot_use(name, raw, expected):
    c = configuration.load_config("demo")
    configuration.apply_overrides(c, [(name, raw)])
    with pytest.raises(ConfigError) as e:
        configuration.validate(c)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_tfds_and_folder_need_their_names():
    c = configuration.load_config("demo")
    configuration.apply_overrides(c, [("data.source", "tfds")])
    with pytest.raises(ConfigError, match="needs data.name"):
        configuration.validate(c)
    c = configuration.load_config("demo")
    configuration.apply_overrides(c, [("data.source", "folder")])
    with pytest.raises(ConfigError, match="needs data.path"):
        configuration.validate(c)


def test_misspelt_field_inside_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jaxssl.configuration import default_config\n"
                    "def get_config():\n"
                    "    c = default_config()\n"
                    "    c.optim.temprature = 0.1\n"
                    "    return c\n")
    with pytest.raises(ConfigError) as e:
        configuration.load_config(str(path))
    assert "temprature" in str(e.value) and "\n" not in str(e.value)


def test_a_config_file_missing_fields_or_get_config(tmp_path):
    (tmp_path / "partial.py").write_text(
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 0})\n")
    with pytest.raises(ConfigError, match="lacks the fields"):
        configuration.load_config(str(tmp_path / "partial.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        configuration.load_config(str(tmp_path / "empty.py"))
    with pytest.raises(ConfigError, match="not found.*demo"):
        configuration.load_config("no_such_config")
