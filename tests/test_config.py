"""Config: YAML loading, type-checked overrides, unknown keys, saving."""

from __future__ import annotations

import pytest
import yaml

from cimlic.config import Config, ConfigError, apply_override, load_config, save_config, to_dict

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: voc\nloss:\n  name: db\n  db:\n    mu: 0.2\n    lam: 2\nsampler:\n  name: class_aware\n")
    cfg = load_config(path, ["loss.db.kappa=0.1", "seed=3", "eval.ap=voc07_11pt", "data.classes=x.txt"])
    assert cfg.name == "voc" and cfg.loss.name == "db" and cfg.sampler.name == "class_aware"
    assert cfg.loss.db.mu == 0.2 and cfg.loss.db.lam == 2.0 and isinstance(cfg.loss.db.lam, float)
    assert cfg.loss.db.kappa == 0.1 and cfg.seed == 3 and cfg.eval.ap == "voc07_11pt"
    assert cfg.loss.asl.gamma_neg == 4.0  # untouched default
    apply_override(cfg, "name=2024")  # a string field keeps numeric-looking text as text
    assert cfg.name == "2024"
    apply_override(cfg, "data.image_pattern={id}.png")  # not a YAML mapping: string fields take the text
    assert cfg.data.image_pattern == "{id}.png"
    apply_override(cfg, "train.lr=1e-5")  # YAML 1.1 reads 1e-5 as a string: float fields accept it
    assert cfg.train.lr == 1e-5
    apply_override(cfg, 'model.templates=["a photo of a {}.", "a {}."]')
    assert cfg.model.templates == ["a photo of a {}.", "a {}."]
    apply_override(cfg, "loss.asl.detach_focusing=true")
    assert cfg.loss.asl.detach_focusing is True


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["loss.name=asl", "loss.asl.margin=0.1"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.asl.gamma_neg=abc", r"loss.asl.gamma_neg: expected a number, got 'abc'"),
        ("seed=1.5", r"seed: expected an integer"),
        ("loss.asl.detach_focusing=maybe", r"expected true/false"),
        ("eval.ap=voc12", r"eval.ap: 'voc12' is not one of \['sklearn', 'voc_all_point', 'voc07_11pt'\]"),
        ("loss.nam=asl", r"unknown key 'nam' in loss; valid keys: \['asl', 'cb'"),
        ("loss=asl", r"loss is a section"),
        ("loss.name", r"expected KEY=VALUE"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(Config(), override)


def test_bad_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  nme: bce\n")
    with pytest.raises(ConfigError, match=r"c.yaml: loss: unknown key\(s\) \['nme'\]; valid keys"):
        load_config(path)
    path.write_text("loss: [1, 2\n")
    with pytest.raises(ConfigError, match="c.yaml: malformed YAML in this config file"):
        load_config(path)
    path.write_text("sampler:\n  per_class: three\n")
    with pytest.raises(ConfigError, match="sampler.per_class: expected an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert yaml.safe_load(path.read_text())  # not empty
    if path.parent.name == "tagger":  # a method for your own data: the data section comes from `cimlic import`
        assert not cfg.data.classes and "data.yaml" in path.read_text()
    else:
        assert cfg.data.classes and (cfg.data.train_labels or cfg.fewshot.base_labels)


def test_keys_moved_into_method_sections_are_still_read(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  name: dualcoop\n  tau_s: 3.0\n  n_ctx_neg: 4\n  probe_init: zeroshot\n")
    with caplog.at_level("WARNING", logger="cimlic.config"):
        cfg = load_config(path, ["model.tau=7", "model.probe_normalize=false"])
    assert (cfg.model.dualcoop.tau_s, cfg.model.dualcoop.n_ctx_neg, cfg.model.dualcoop.tau) == (3.0, 4, 7.0)
    assert cfg.model.linear_probe.init == "zeroshot" and cfg.model.linear_probe.normalize is False
    assert "model.tau_s is now model.dualcoop.tau_s" in caplog.text and "model.tau is now" in caplog.text
    assert "tau_s" not in to_dict(cfg)["model"]  # saved in the new place only
    path.write_text("model:\n  tau_s: 3.0\n  dualcoop:\n    tau_s: 4.0\n")
    with pytest.raises(ConfigError, match="both model.tau_s and model.dualcoop.tau_s"):
        load_config(path)


def test_method_sections_come_from_the_method_table():
    from cimlic.config import ModelConfig
    from cimlic.models import config_sections

    sections = config_sections()
    assert {"hpdval", "cprfl", "trmml", "dualcoop", "linear_probe", "diversity"} <= set(sections)
    model = ModelConfig()
    for key, section in sections.items():
        assert isinstance(getattr(model, key), section), key
    with pytest.raises(ConfigError, match="unknown key 'nope' in model.hpdval"):
        apply_override(Config(), "model.hpdval.nope=1")


def test_several_files_merge_in_order_and_name_the_bad_one(tmp_path):
    method = tmp_path / "method.yaml"
    method.write_text(
        "name: m\nmodel: {name: coop, n_ctx: 8}\ntrain: {epochs: 5, lr: 0.01}\ndata: {val_fraction: 0.2}\n"
    )
    data = tmp_path / "data.yaml"
    data.write_text("data: {classes: c.txt, train_labels: t.txt}\ntrain: {epochs: 7}\n")
    cfg = load_config([method, data], ["train.lr=0.5"])
    assert (cfg.name, cfg.model.name, cfg.model.n_ctx) == ("m", "coop", 8)  # kept from the first file
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.5)  # the later file, then --set, win key by key
    assert (cfg.data.classes, cfg.data.val_fraction) == ("c.txt", 0.2)  # sections merge
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train: unknown key\(s\) \['epoch'\]"):
        load_config([method, bad])
