import pytest
import yaml

from sparsetrain.app.config import Config, ConfigError, load_config, parse_overrides


@pytest.mark.parametrize(
    "override, key, value, allowed",
    [
        ("sparsity.sparsity=1.0", "sparsity.sparsity", "1.0", "less than 1"),
        ("sparsity.sparsity=-0.1", "sparsity.sparsity", "-0.1", "greater than or equal to 0"),
        ("optim.epochs=0", "optim.epochs", "0", "greater than 0"),
        ("optim.batch_size=-4", "optim.batch_size", "-4", "greater than 0"),
        ("model.name=resnet999", "model.name", "'resnet999'", "resnet20"),
        ("data.dataset=svhn", "data.dataset", "'svhn'", "cifar10"),
        ("sparsity.method=magic", "sparsity.method", "'magic'", "mest"),
        ("optim.schedule=linear", "optim.schedule", "'linear'", "cosine"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_allowed(override, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert key in msg and f"(got {value})" in msg and allowed in msg


def test_unknown_keys_are_refused_with_the_allowed_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\nextras: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.learning_rate: unknown key" in msg and "'lr'" in msg
    assert "extras: unknown key" in msg and "'optim'" in msg


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_overrides_merge_over_the_file_and_parse_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\n  epochs: 3\nmodel:\n  name: vgg16\n")
    cfg = load_config(
        path,
        [
            "optim.lr=0.2",
            "sparsity.method=static",
            "sparsity.sparsity=0.5",
            "sparsity.dense_layers=[first]",
            "run.progress=false",
        ],
    )
    assert cfg.optim.lr == 0.2 and cfg.optim.epochs == 3 and cfg.model.name == "vgg16"
    assert cfg.sparsity.dense_layers == ["first"] and cfg.run.progress is False
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["optim.lr"])


def test_resolved_config_round_trips():
    cfg = load_config(overrides=["optim.lr=0.3", "sparsity.method=static", "sparsity.sparsity=0.8"])
    again = Config.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
