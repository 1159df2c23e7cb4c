"""Study specs: validation on load (every bad key named with its file), built-ins, round trips,
command-line overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from normlab.cli import main
from normlab.errors import ConfigError
from normlab.study.spec import (
    builtin_names,
    builtin_text,
    load_spec,
    load_spec_file,
    shadowed_keys,
    spec_from_dict,
    spec_to_dict,
    with_overrides,
)

BUILTINS = ("batch-size", "l2", "placement", "sync-bn", "train-mode", "xbn", "xbn-resnet50")


def good() -> dict:
    return {
        "name": "tiny",
        "seeds": 2,
        "base": {
            "model": {"name": "mlp"},
            "data": {"name": "synthetic", "synthetic_samples": 64},
            "epochs": 1,
        },
        "variants": {"bn": {"norm.name": "bn"}, "gn": {"norm": {"name": "gn", "gn_groups": 8}}},
    }


def write(tmp_path, data) -> str:
    path = tmp_path / "study.yml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_good_spec_loads_with_defaults(tmp_path):
    spec = load_spec_file(write(tmp_path, good()))
    assert spec.name == "tiny" and spec.seeds == (0, 1) and spec.baseline == "bn"
    assert spec.variant_names == ["bn", "gn"] and spec.group_names == [None]
    # nested overrides are flattened to dotted keys
    assert dict(spec.variant("gn").overrides) == {"norm.name": "gn", "norm.gn_groups": 8}
    cfg = spec.arm_config(None, "gn", seed=5)
    assert cfg.norm.name == "gn" and cfg.norm.gn_groups == 8 and cfg.seed == 5
    assert cfg.model.name == "mlp" and cfg.epochs == 1


def test_long_form_entries_and_explicit_seed_lists():
    data = good()
    data["seeds"] = [3, 7]
    data["variants"]["gn"] = {"description": "GroupNorm", "set": {"norm.name": "gn"}}
    spec = spec_from_dict(data)
    assert spec.seeds == (3, 7) and spec.variant("gn").description == "GroupNorm"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(variantz={}), "unknown key 'variantz' at the top level"),
        (lambda d: d.pop("name"), "missing key 'name'"),
        (lambda d: d.pop("variants"), "missing key 'variants'"),
        (lambda d: d.update(name="a b"), "name must be a name of letters"),
        (lambda d: d.update(name=3), "name must be a name of letters"),
        (lambda d: d.update(description=["x"]), "description must be a string"),
        (lambda d: d.update(base=[1]), "base must be a mapping"),
        (lambda d: d["base"].update(optim={"lrr": 1}), "base: unknown key 'optim.lrr'"),
        (lambda d: d["base"].update(epochs="ten"), "base: epochs must be an integer"),
        (lambda d: d["base"].update(seed=1), "base sets 'seed'"),
        (lambda d: d.update(variants={}), "variants must be a non-empty mapping"),
        (lambda d: d.update(variants=["bn"]), "variants must be a non-empty mapping"),
        (lambda d: d["variants"].update({"a/b": {}}), "variants name must be a name"),
        (lambda d: d["variants"].update(gn=5), "variants.gn must be a mapping of config overrides"),
        (
            lambda d: d["variants"].update(gn={"optim.lrr": 1}),
            "variants.gn: unknown key 'optim.lrr'",
        ),
        (
            lambda d: d["variants"].update(gn={"optim.lr": "fast"}),
            "variants.gn: optim.lr must be a number",
        ),
        (lambda d: d["variants"].update(gn={"norm.name": "nope"}), "variants.gn: norm.name"),
        (lambda d: d["variants"].update(gn={"seed": 3}), "variants.gn sets 'seed'"),
        (
            lambda d: d["variants"].update(gn={"set": {}, "colour": "red"}),
            "unknown key 'variants.gn.colour'",
        ),
        (lambda d: d["variants"].update(gn={"set": [1]}), "variants.gn.set must be a mapping"),
        (
            lambda d: d["variants"].update(gn={"set": {}, "description": 1}),
            "variants.gn.description must be a string",
        ),
        (lambda d: d.update(groups=[]), "groups must be a non-empty mapping"),
        (lambda d: d.update(groups={"g": {"optim.lrr": 1}}), "groups.g: unknown key 'optim.lrr'"),
        (
            lambda d: d.update(groups={"g": {"model.placement": "middle"}}),
            "groups.g: model.placement must be 'pre' or 'post'",
        ),
        (lambda d: d.update(baseline="ln"), "baseline must name one of the variants (bn, gn)"),
        (lambda d: d.update(seeds=0), "seeds must be a count >= 1"),
        (lambda d: d.update(seeds="three"), "seeds must be a count >= 1"),
        (lambda d: d.update(seeds=[1, 1]), "seeds must be distinct"),
        (lambda d: d.update(seeds=[0, -1]), "seeds[1] must be an integer >= 0"),
        (lambda d: d.update(seeds=[True]), "seeds[0] must be an integer >= 0"),
        (lambda d: d.update(optional_probes="weights"), "optional_probes must be a list"),
        (lambda d: d.update(lr_reference_batch_size=0), "lr_reference_batch_size must be"),
    ],
)
def test_every_bad_key_is_named_with_the_file(tmp_path, change, expected):
    data = good()
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_a_bad_key_in_one_group_and_variant_combination_names_both():
    data = good()
    data["groups"] = {"small": {"batch_size": 8}, "big": {"batch_size": 0}}
    with pytest.raises(ConfigError, match=r"groups\.big: batch_size \(--batch-size\) must be >= 1"):
        spec_from_dict(data, source="s.yaml")


def test_files_that_are_not_studies(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec_file(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{bad}: not valid YAML"):
        load_spec_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"{listy}: expected a mapping"):
        load_spec_file(listy)
    with pytest.raises(ConfigError, match="unknown study 'nope'; built-in studies: batch-size"):
        load_spec("nope")
    with pytest.raises(ConfigError, match="not a study directory"):
        load_spec(tmp_path)


def test_builtins_are_listed_and_valid():
    assert tuple(builtin_names()) == BUILTINS
    for name in BUILTINS:
        spec = load_spec(name)
        assert spec.name == name and spec.description and len(spec.seeds) >= 3
        assert spec.baseline in spec.variant_names
        # the saved form loads back to an equal spec
        assert spec_from_dict(spec_to_dict(spec), source=spec.source) == spec
        assert yaml.safe_load(builtin_text(name))["name"] == name


def test_builtin_contents_match_the_seeds():
    placement = load_spec("placement")
    assert placement.variant_names == ["pre", "post"]
    assert [g.name for g in placement.groups] == ["mobilenetv2", "resnet20", "mlp"]
    l2 = load_spec("l2")
    assert l2.optional_probes == ("weights",)
    assert {v: l2.arm_config(None, v).optim.l2 for v in l2.variant_names} == {
        "bn-only": 0.0,
        "l2-only": 0.001,
        "bn+l2": 0.001,
        "neither": 0.0,
    }
    assert l2.arm_config(None, "l2-only").norm.name == "none"
    mode = load_spec("train-mode")
    stale = mode.arm_config(None, "stats-never-updated").norm
    assert stale.name == "bn" and stale.torch_momentum() == 0.0
    assert mode.arm_config(None, "frozen-at-init").norm.name == "frozen_bn"
    xbn = load_spec("xbn")
    mnv2_gn = xbn.arm_config("mobilenetv2", "gn")
    assert mnv2_gn.norm.name == "gn" and mnv2_gn.norm.gn_groups == 8
    assert xbn.arm_config("resnet20", "xbn").model.options["xbn"] is True
    bs = load_spec("batch-size")
    assert [g.name for g in bs.groups] == [f"bs{2**k}" for k in range(1, 8)]
    # the learning rate scales linearly with the batch size (reference 128)
    for g in bs.groups:
        cfg = bs.arm_config(g.name, "gn")
        assert cfg.optim.lr == pytest.approx(0.1 * cfg.batch_size / 128)


def test_command_line_overrides_change_the_base():
    spec = spec_from_dict(good(), source="s.yaml")
    new = with_overrides(
        spec, seeds=4, epochs=3, data="digits", overrides={"optim.lr": 0.2, "norm.name": "ln"}
    )
    assert new.seeds == (0, 1, 2, 3)
    cfg = new.arm_config(None, "bn")
    assert cfg.epochs == 3 and cfg.optim.lr == 0.2 and cfg.data.name == "digits"
    # --data drops the old source's specific settings
    assert "synthetic_samples" not in new.base["data"]
    # a variant's own key wins over the command line, and shadowed_keys says so
    assert cfg.norm.name == "bn"
    assert shadowed_keys(new, ["optim.lr", "norm.name"]) == [
        "norm.name (variant bn)",
        "norm.name (variant gn)",
    ]
    assert with_overrides(spec, seeds=[5, 9]).seeds == (5, 9)
    with pytest.raises(ConfigError, match="command-line settings for study 'tiny': unknown key"):
        with_overrides(spec, overrides={"optim.lrr": 1})
    with pytest.raises(ConfigError, match="--seeds"):
        with_overrides(spec, overrides={"seed": 1})


def test_studies_command_lists_and_shows(capsys):
    assert main(["studies"]) == 0
    text = capsys.readouterr().out
    for name in BUILTINS:
        assert f"{name}:" in text
    assert "baseline pre" in text
    assert main(["studies", "--show", "batch-size"]) == 0
    assert "lr_reference_batch_size: 128" in capsys.readouterr().out
    assert main(["studies", "--show", "nope"]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err


def test_study_command_reports_a_bad_spec_in_one_line(tmp_path, capsys):
    data = good()
    data["variants"]["gn"] = {"optim.lrr": 1}
    path = write(tmp_path, data)
    assert main(["study", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "variants.gn: unknown key 'optim.lrr'" in err
    assert path in err
    assert main(["study", "placement", "--seeds", "x", "--dry-run"]) == 2
    assert "--seeds must be a count" in capsys.readouterr().err


FINDINGS = Path(__file__).resolve().parents[1] / "docs" / "findings"


def test_the_findings_specs_are_valid_and_match_their_questions():
    """docs/findings/specs/*.yaml are what docs/findings.md reports; keep them loadable and
    keep the properties the findings rely on (issue 7's requirements)."""
    from normlab.study.plan import plan_study

    specs = {p.stem: load_spec(str(p)) for p in sorted((FINDINGS / "specs").glob("*.yaml"))}
    assert set(specs) == {
        "placement", "l2", "l2-lsuv", "train-mode", "batch-size", "batch-size-mobilenetv2",
        "batch-size-shift", "no-norm-resnet",
    }  # fmt: skip
    for name, spec in specs.items():
        assert spec.name == name and spec.baseline in spec.variant_names
        assert spec.base["data"]["name"] == "cifar10"
        plan = plan_study(spec, Path("/nonexistent/study"))
        assert len(plan.runs) == len(spec.seeds) * len(spec.variant_names) * max(
            1, len(spec.groups)
        )
    placement = specs["placement"]
    assert len(placement.seeds) >= 6  # the sign-flip test needs six pairs to reach p < 0.05
    assert set(placement.group_names) == {"resnet20", "mobilenetv2", "mlp"}
    assert "acts" in placement.base["probes"]
    assert specs["l2"].base["probes"] == ["weights"]
    assert set(specs["l2"].variant_names) == {"bn-only", "l2-only", "bn+l2", "neither"}
    # the no-norm arms again from LSUV, under the l2 study's protocol otherwise
    lsuv = specs["l2-lsuv"]
    assert lsuv.base == specs["l2"].base
    for arm in ("l2-only", "neither"):
        cfg, ref = lsuv.arm_config(None, f"{arm}-lsuv"), specs["l2"].arm_config(None, arm)
        assert cfg.model.init == "lsuv" and cfg.norm.name == "none"
        assert cfg == dataclasses.replace(ref, model=dataclasses.replace(ref.model, init="lsuv"))
    mode = specs["train-mode"]
    assert {"stats-never-updated", "keras-0.99", "keras-0.999"} <= set(mode.variant_names)
    bs = specs["batch-size"]
    sizes = sorted(bs.arm_config(g, "bn").batch_size for g in bs.group_names)
    assert sizes[0] == 2 and sizes[-1] == 128
    mbs = specs["batch-size-mobilenetv2"]
    assert mbs.arm_config(mbs.group_names[0], "xbn").model.name == "mobilenetv2"
    # it extends the ResNet-20 study: the same protocol, two of its batch sizes
    assert mbs.group_names == ["bs8", "bs128"] and mbs.seeds == bs.seeds
    for key in ("data", "optim", "epochs", "probes", "norm"):
        assert mbs.base[key] == bs.base[key], key
    # ResNet-20 with BN vs without any norm from four initialisations
    nn_ = specs["no-norm-resnet"]
    inits = {
        v: (c.norm.name, c.model.init, bool(c.model.options.get("skip_init")))
        for v in nn_.variant_names
        for c in [nn_.arm_config(None, v)]
    }
    assert inits == {
        "bn": ("bn", "default", False),
        "none": ("none", "default", False),
        "none-lsuv": ("none", "lsuv", False),
        "none-skipinit": ("none", "default", True),
        "none-skipinit-lsuv": ("none", "lsuv", True),
    }
    assert {ref for _, ref in nn_.comparisons} == {"none"}
    # the shift remeasured on a fixed 2,048-image sample, training exactly as in batch-size
    shift = specs["batch-size-shift"]
    assert shift.base["probes"] == ["shift:images=2048:val_samples=500"]
    assert shift.variant_names == ["bn", "xbn"] and shift.group_names == bs.group_names
    for g in shift.group_names:
        for v in shift.variant_names:
            assert dataclasses.replace(shift.arm_config(g, v), probes=()) == dataclasses.replace(
                bs.arm_config(g, v), probes=()
            )
    for spec in (bs, mbs):
        assert set(spec.variant_names) == {"bn", "xbn", "gn"}
        # linear learning-rate scaling: lr = 0.1 * batch_size / 128
        for g in spec.group_names:
            cfg = spec.arm_config(g, "gn")
            assert cfg.optim.lr == pytest.approx(0.1 * cfg.batch_size / 128)


# --------------------------------------------------------------------------------------------
# extends


def _write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_extends_merges_mappings_replaces_the_rest_and_drops_null_entries(tmp_path, monkeypatch):
    parent = good() | {
        "groups": {"a": {"batch_size": 8}, "b": {"batch_size": 16}},
        "optional_probes": ["weights"],
        "notes": "parent",
    }
    parent["base"]["data"]["image_size"] = 12
    _write(tmp_path / "specs" / "parent.yaml", parent)
    child = {
        "name": "child",
        "extends": "parent.yaml",  # relative to the child's folder, not the working directory
        "base": {"epochs": 3, "data": {"image_size": None}},
        "groups": {"b": None},
        "variants": {"gn": None, "ln": {"norm.name": "ln"}},
        "optional_probes": [],
    }
    path = _write(tmp_path / "specs" / "child.yaml", child)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(path)
    assert spec.name == "child" and spec.notes == "parent" and len(spec.seeds) == 2
    # base merged key by key: the child's epochs, the parent's model and data keys, and a null
    # value set (full-size images), not dropped
    assert spec.base["epochs"] == 3 and spec.base["model"] == {"name": "mlp"}
    assert spec.base["data"] == {"name": "synthetic", "synthetic_samples": 64, "image_size": None}
    assert spec.group_names == ["a"]  # null dropped group b
    assert spec.variant_names == ["bn", "ln"]  # null dropped gn; ln added
    assert list(spec.optional_probes) == []  # lists are replaced, not merged
    # the saved form is self-contained: it loads without the parent
    again = spec_from_dict(spec_to_dict(spec))
    assert spec_to_dict(again) == spec_to_dict(spec)


def test_extends_follows_chains_and_built_in_names(tmp_path):
    _write(tmp_path / "a.yaml", {"name": "a", "extends": "placement", "seeds": 5})
    _write(tmp_path / "sub" / "b.yaml", {"name": "b", "extends": "../a.yaml", "seeds": 2})
    spec = load_spec(tmp_path / "sub" / "b.yaml")
    placement = load_spec("placement")
    assert spec.name == "b" and len(spec.seeds) == 2
    assert spec.variant_names == placement.variant_names and spec.base == placement.base


def test_extends_errors_name_the_file_and_the_problem(tmp_path):
    _write(tmp_path / "x.yaml", {"name": "x", "extends": "y.yaml"})
    _write(tmp_path / "y.yaml", {"name": "y", "extends": "x.yaml"})
    with pytest.raises(
        ConfigError, match=r"x\.yaml: extends cycle: .*x\.yaml -> .*y\.yaml -> .*x\.yaml"
    ):
        load_spec(tmp_path / "x.yaml")
    _write(tmp_path / "lost.yaml", {"name": "lost", "extends": "nowhere.yaml"})
    with pytest.raises(ConfigError, match=r"lost\.yaml: extends: no study file .*nowhere\.yaml"):
        load_spec(tmp_path / "lost.yaml")
    _write(tmp_path / "bad.yaml", {"name": "bad", "extends": "no-such-study"})
    with pytest.raises(ConfigError, match=r"unknown study 'no-such-study'; built-in studies"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    _write(tmp_path / "top.yaml", {"name": "top", "extends": "list.yaml"})
    with pytest.raises(ConfigError, match=r"top\.yaml: extends: .*list\.yaml is not a mapping"):
        load_spec(tmp_path / "top.yaml")


def test_extra_comparisons_are_validated_and_round_trip():
    three = good()
    three["variants"]["ln"] = {"norm.name": "ln"}
    spec = spec_from_dict({**three, "comparisons": [["ln", "gn"]]})
    assert spec.comparisons == (("ln", "gn"),)
    assert spec_from_dict(spec_to_dict(spec)) == dataclasses.replace(spec, source=None)
    bad = {
        "nope": ([["ln", "xx"]], r"comparisons\[0\]: unknown variant 'xx'; variants: bn, gn, ln"),
        "self": ([["gn", "gn"]], r"comparisons\[0\] compares 'gn' with itself"),
        "base": ([["gn", "bn"]], r"compared with the baseline 'bn' already"),
        "twice": ([["ln", "gn"], ["ln", "gn"]], r"comparisons\[1\]: \[ln, gn\] is listed twice"),
        "shape": ([["ln"]], r"comparisons\[0\] must be a \[variant, reference\] pair"),
        "type": ("ln-gn", r"comparisons must be a list of \[variant, reference\] pairs"),
    }
    for value, message in bad.values():
        with pytest.raises(ConfigError, match=message):
            spec_from_dict({**three, "comparisons": value}, source="s.yaml")
