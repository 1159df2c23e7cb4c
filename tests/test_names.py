"""Names checked at the edge (normlab.train.names.resolve_names): configs store names, and
every name is resolved before a run, or a study's first run, starts."""

from __future__ import annotations

import pytest
from _helpers import tiny_base, tiny_config

from normlab.config import ModelConfig
from normlab.data.sources import SOURCES
from normlab.errors import ConfigError
from normlab.study.plan import plan_study
from normlab.study.spec import spec_from_dict
from normlab.train import fit
from normlab.train.names import resolve_names


def test_a_config_stores_names_and_resolution_checks_them():
    # a config is data: it constructs with a name nobody has registered...
    assert ModelConfig(name="no-such-model", options={"bogus": 1}).name == "no-such-model"
    # ...and resolving it names what is wrong and what exists
    with pytest.raises(
        ConfigError, match=r"unknown model 'no-such-model'; known models: .*resnet20"
    ):
        resolve_names(tiny_config(**{"model.name": "no-such-model"}))
    with pytest.raises(ConfigError, match=r"model 'resnet20' has no option 'bogus'"):
        resolve_names(tiny_config(**{"model.options": {"bogus": 1}}))
    with pytest.raises(ConfigError, match=r"unknown probe 'weigths'.*known probes: .*weights"):
        resolve_names(tiny_config(probes=["weigths"]))
    resolved = resolve_names(tiny_config(probes=["weights", "shift:batches=2"]))
    assert resolved.model.name == "resnet20" and resolved.source is SOURCES.get("synthetic")
    assert [p.name for p in resolved.probes] == ["weights", "shift"]
    # norm options are model options too (model.gn_groups is norm.gn_groups)
    resolve_names(tiny_config(**{"model.options": {"gn_groups": 4}}))


def test_fit_refuses_a_bad_name_before_it_writes_anything(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="unknown model 'resnet21'"):
        fit(tiny_config(**{"model.name": "resnet21"}), out=out, verbose=False)
    assert not out.exists()


def _spec(**variant_overrides):
    return spec_from_dict(
        {
            "name": "names",
            "base": tiny_base(),
            "baseline": "bn",
            "variants": {"bn": {"norm.name": "bn"}, **variant_overrides},
            "seeds": [0],
        }
    )


def test_a_study_with_a_misspelt_name_fails_before_its_first_run(tmp_path):
    with pytest.raises(ConfigError, match=r"variant 'odd'.*has no option 'alhpa'"):
        plan_study(_spec(odd={"model.name": "mobilenetv2", "model.alhpa": 0.5}), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"variant 'p'.*unknown probe 'gapp'"):
        plan_study(_spec(p={"probes": ["gapp"]}), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _optional(probes):
    return spec_from_dict(
        {
            "name": "names",
            "base": tiny_base(),
            "baseline": "bn",
            "variants": {"bn": {}},
            "seeds": [0],
            "optional_probes": probes,
        }
    )


def test_a_misspelt_optional_probe_is_an_error_not_silently_dropped(tmp_path):
    with pytest.raises(ConfigError, match=r"optional_probes: .*unknown probe 'weigths'"):
        plan_study(_optional(["weigths"]), tmp_path / "s")
    plan = plan_study(_optional(["weights"]), tmp_path / "t")
    assert plan.probes_dropped == () and plan.runs[0].config.probes == ("weights",)
