"""Numbers as users write them (``1e-3``, ``5E-4``, ``2.0e9``) wherever normlab reads a number,
strings that look like numbers kept where a string is expected, and one YAML file reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from _helpers import tiny_base

from normlab.bn.load import build_arch
from normlab.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
)
from normlab.errors import ConfigError
from normlab.models import build_model
from normlab.probes import build_probes
from normlab.probes.base import parse_probe_spec
from normlab.study.spec import load_spec, load_spec_file, spec_from_dict, with_overrides
from normlab.train import fit
from normlab.yamlio import Spelled, as_text, dumps, loads, read_yaml_mapping

pytestmark = pytest.mark.usefixtures("one_thread")

# every spelling the issue names, and what it is
SPELLINGS = [
    ("1e-3", 1e-3),
    ("5E-4", 5e-4),
    ("2e-1", 0.2),
    ("1.0e+9", 1e9),
    ("1e3", 1000.0),
    ("2.0e9", 2e9),
    ("-1e-3", -1e-3),
    ("+.5", 0.5),
    ("0.1", 0.1),
    ("3", 3.0),  # an int where a float is expected
]


@pytest.mark.parametrize(("text", "value"), SPELLINGS)
def test_the_loader_reads_yaml_1_2_floats(text, value):
    got = loads(text)
    assert got == value
    if "." in text or "e" in text.lower():
        assert isinstance(got, float)
    else:
        assert type(got) is int


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("123", 123),
        ("0x1F", 31),  # ints, booleans and null as PyYAML's SafeLoader reads them
        ("true", True),
        ("null", None),
        ("1_000.5", 1000.5),  # YAML 1.1 floats stay floats
        ("fast", "fast"),
        ("1e", "1e"),
        ("e3", "e3"),
        ("1.2.3", "1.2.3"),
        ("1e3x", "1e3x"),
    ],
)
def test_everything_else_reads_as_safe_load_does(text, value):
    assert loads(text) == value == yaml.safe_load(text)
    assert type(loads(text)) is type(yaml.safe_load(text))


def test_a_number_yaml_1_1_read_as_text_keeps_its_text():
    got = loads("a: 1e3\nb: 0.5\n1e3: key\n")
    assert isinstance(got["a"], Spelled) and got["a"].text == "1e3" and as_text(got["a"]) == "1e3"
    assert type(got["b"]) is float and as_text(got["b"]) == 0.5
    assert list(got)[2] == "1e3"  # keys stay text
    # written back as plain floats; strings that would read as numbers are quoted
    text = dumps({"a": got["a"], "path": "1e3", "tiny": 1e-10})
    assert yaml.safe_load(text) == {"a": 1000.0, "path": "1e3", "tiny": 1e-10}
    assert loads(text) == {"a": 1000.0, "path": "1e3", "tiny": 1e-10}
    assert type(loads(text)["a"]) is float and type(yaml.safe_load(text)["tiny"]) is float


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "value"), SPELLINGS[:7])
def test_every_spelling_through_a_config_file(tmp_path, text, value):
    f = _write(
        tmp_path / "c.yaml",
        f"optim:\n  lr: {text.lstrip('-')}\n  weight_decay: {text.lstrip('-')}\n"
        f"norm:\n  bn_eps: {text.lstrip('-')}\n",
    )
    cfg = load_config(f)
    assert cfg.optim.lr == cfg.optim.weight_decay == cfg.norm.bn_eps == abs(value)
    assert type(cfg.optim.lr) is float and type(cfg.norm.bn_eps) is float


@pytest.mark.parametrize(("text", "value"), SPELLINGS)
def test_every_spelling_through_set(text, value):
    data = {}
    for item in (f"optim.warmup_epochs={text.lstrip('-')}", f"optim.grad_clip={text.lstrip('-')}"):
        key, v = parse_override(item)
        data = apply_overrides(data, {key: v})
    cfg = config_from_dict(data)
    assert cfg.optim.warmup_epochs == cfg.optim.grad_clip == abs(value)
    assert type(cfg.optim.warmup_epochs) is float and type(cfg.optim.grad_clip) is float


def test_the_issues_settings_through_set():
    items = [
        "optim.lr=1e-3",
        "optim.weight_decay=5E-4",
        "norm.bn_eps=1e-5",
        "norm.bn_momentum=1e-2",
        "data.val_split=2e-1",
        "model.name=mobilenetv2",
        "model.alpha=5e-1",
        "runtime.dist_timeout=1e3",
    ]
    cfg = config_from_dict(apply_overrides({}, dict(parse_override(i) for i in items)))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-4)
    assert (cfg.norm.bn_eps, cfg.norm.bn_momentum) == (1e-5, 1e-2)
    assert cfg.data.val_split == 0.2 and cfg.runtime.dist_timeout == 1000.0
    # model options are untyped: a value written as a number is stored as a plain float
    assert cfg.model.options == {"alpha": 0.5} and type(cfg.model.options["alpha"]) is float
    assert config_from_dict({"optim": {"lr": 2.0e9}}).optim.lr == 2e9
    assert (
        config_from_dict(apply_overrides({}, dict([parse_override("optim.lr=2.0e9")]))).optim.lr
        == 2e9
    )


def test_a_model_option_spelled_with_an_exponent_builds_the_same_model():
    def size(model):
        return sum(p.numel() for p in model.parameters())

    half = build_model("mobilenetv2", 10, input_size=32, alpha=0.5)
    cfg = config_from_dict(
        apply_overrides(
            {}, dict([parse_override("model.name=mobilenetv2"), parse_override("model.alpha=5e-1")])
        )
    )
    built = build_model(cfg.model.name, 10, input_size=32, **cfg.model.options)
    assert size(built) == size(half) != size(build_model("mobilenetv2", 10, input_size=32))
    # the BN toolbox's normlab:NAME,key=value options read numbers the same way
    assert size(
        build_arch("normlab:mobilenetv2,alpha=5e-1", num_classes=10, input_size=32)
    ) == size(half)


def test_probe_options_take_numbers_as_written():
    (shift,) = build_probes(["shift:images=2048:batches=8"])
    assert shift.options["images"] == 2048 and shift.options["batches"] == 8
    cfg = config_from_dict(
        apply_overrides({}, dict([parse_override("probes=[shift:images=2048]")]))
    )
    assert cfg.probes == ("shift:images=2048",)
    float_option = {"frac": (float, 0.5, None, "a float option")}
    for text, value in SPELLINGS:
        _, options = parse_probe_spec(f"x:frac={text}", float_option)
        assert options == {"frac": value}
    with pytest.raises(
        ConfigError, match="option images of probe 'shift' must be an integer, got 'lots'"
    ):
        build_probes(["shift:images=lots"])


def test_the_resolved_config_yaml_stores_floats(tmp_path):
    base = tiny_base(epochs=1)
    overrides = dict(
        parse_override(i)
        for i in (
            "optim.lr=5e-2",
            "optim.weight_decay=5E-4",
            "norm.bn_eps=1e-5",
            "data.val_split=2.5e-1",
        )
    )
    result = fit(
        config_from_dict(apply_overrides(base, overrides)), out=tmp_path / "run", verbose=False
    )
    assert result.status == "completed"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # plain YAML 1.1
    assert saved["optim"]["lr"] == 0.05 and saved["optim"]["weight_decay"] == 5e-4
    assert saved["norm"]["bn_eps"] == 1e-5 and saved["data"]["val_split"] == 0.25
    for value in (saved["optim"]["lr"], saved["optim"]["weight_decay"], saved["norm"]["bn_eps"]):
        assert type(value) is float
    assert load_config(tmp_path / "run" / "config.yaml") == result.config


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("optim.lr=1e", "optim.lr must be a number, got '1e'"),
        ("data.val_split=most", "data.val_split must be a number, got 'most'"),
        ("norm.bn_eps=tiny", "norm.bn_eps must be float or NoneType, got 'tiny'"),
        ("epochs=1e3", "epochs must be an integer, got 1000.0"),
    ],
)
def test_what_is_not_a_number_is_still_refused_by_name(item, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(apply_overrides({}, dict([parse_override(item)])))
    assert message in str(exc.value)


def test_a_non_number_in_a_file_is_refused_naming_the_file_and_key(tmp_path):
    f = _write(tmp_path / "c.yaml", "optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lr must be a number, got 'fast'"):
        load_config(f)
    with pytest.raises(
        ConfigError, match=r"model 'mobilenetv2' option alpha must be in .* got 'wide'"
    ):
        build_arch("normlab:mobilenetv2,alpha=wide", num_classes=10, input_size=32)


def test_text_that_looks_like_a_number_stays_text_in_string_fields(tmp_path):
    cfg = config_from_dict(
        apply_overrides(
            {}, dict([parse_override("data.name=imagefolder"), parse_override("data.path=1e3")])
        )
    )
    assert cfg.data.path == "1e3"
    f = _write(
        tmp_path / "c.yaml", "model:\n  name: 2e1\ndata:\n  name: imagefolder\n  path: 1e3\n"
    )
    cfg = load_config(f)
    assert (cfg.model.name, cfg.data.path) == ("2e1", "1e3")
    # written quoted, so it reads back as text with any YAML reader
    text = dumps(config_to_dict(cfg))
    assert "path: '1e3'" in text and yaml.safe_load(text)["data"]["path"] == "1e3"
    # a config.yaml written by older normlab (plain PyYAML: the path unquoted) still loads
    old = _write(tmp_path / "old.yaml", yaml.safe_dump(config_to_dict(cfg)))
    assert "path: 1e3" in old.read_text()
    assert load_config(old) == cfg


def _study(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    return _write(tmp_path / name, body)


def test_study_specs_read_numbers_in_base_variants_and_extends(tmp_path):
    data = "{name: synthetic, synthetic_samples: 64, val_split: 2e-1}"
    _study(
        tmp_path,
        f"name: parent\nbase:\n  data: {data}\n  optim: {{lr: 1e-3}}\n"
        "variants:\n  a: {}\n  wd: {optim.weight_decay: 5E-4}\n",
        "parent.yaml",
    )
    child = _study(
        tmp_path, "name: 1e3\nextends: parent.yaml\nbase:\n  optim: {warmup_epochs: 1e0}\n"
    )
    spec = load_spec_file(child)
    assert spec.name == "1e3"  # the study's name is text, as written
    cfg = spec.arm_config(None, "wd")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (1e-3, 5e-4, 1.0)
    assert cfg.data.val_split == 0.2
    # --set on a study reads numbers the same way
    key, value = parse_override("optim.lr=2e-2")
    assert with_overrides(spec, overrides={key: value}).arm_config(None, "a").optim.lr == 0.02
    # variant and baseline names that look like numbers stay names
    named = spec_from_dict(
        loads(
            "name: n\nbaseline: 2e1\nbase: {data: {name: synthetic, synthetic_samples: 64}}\n"
            "variants: {1e3: {}, 2e1: {}, 3e0: {}}\ncomparisons: [[1e3, 3e0]]\n"
        )
    )
    assert named.variant_names == ["1e3", "2e1", "3e0"] and named.baseline == "2e1"
    assert named.comparisons == (("1e3", "3e0"),)
    # the built-in studies still load
    assert load_spec("placement").name == "placement"


def test_read_yaml_mapping_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file .*none\.yaml does not exist$"):
        read_yaml_mapping(tmp_path / "none.yaml", what="config file")
    bad = _write(tmp_path / "bad.yaml", "a: [1,\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid YAML: "):
        read_yaml_mapping(bad)
    listy = _write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match=rf"^{listy}: expected a mapping of keys, got list$"):
        read_yaml_mapping(listy, expected="a mapping of keys")
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=rf"^{binary}: not UTF-8 text"):
        read_yaml_mapping(binary)
    assert read_yaml_mapping(_write(tmp_path / "empty.yaml", "")) == {}
    got = read_yaml_mapping(_write(tmp_path / "n.yaml", "lr: 1e-3\n"))
    assert got == {"lr": 0.001} and math.isclose(got["lr"], 1e-3)
