"""Reading TARGETs: Keras .keras/.h5 fixtures (checked against Keras' own values), ONNX files
(read back after export, and with planted defects), state_dicts, pickled modules, callables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normlab.bn import diagnose_layers, load_target, read_keras
from normlab.bn.keras_file import _flatten_layers, _inbound
from normlab.errors import ConfigError, DataError, NormlabError

torch.set_num_threads(1)

KERAS = Path(__file__).parent / "fixtures" / "keras"
EXPECTED = json.loads((KERAS / "expected.json").read_text())


@pytest.mark.parametrize("stem", ["trained", "never_updated"])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_fixture_values_match_keras(stem: str, suffix: str) -> None:
    pytest.importorskip("h5py")
    km = read_keras(KERAS / f"{stem}{suffix}")
    assert km.format == ("keras" if suffix == ".keras" else "h5")
    assert km.keras_version and km.keras_version.startswith("3.")
    expected = EXPECTED[stem]["bn"]
    assert [layer.name for layer in km.layers] == ["bn1", "bn2"]
    for layer in km.layers:
        e = expected[layer.name]
        assert layer.family == "batchnorm" and layer.convention == "keras"
        np.testing.assert_allclose(layer.running_mean.numpy(), e["moving_mean"], rtol=1e-7)
        np.testing.assert_allclose(layer.running_var.numpy(), e["moving_variance"], rtol=1e-7)
        np.testing.assert_allclose(layer.weight.numpy(), e["gamma"], rtol=1e-7)
        np.testing.assert_allclose(layer.bias.numpy(), e["beta"], rtol=1e-7)
        assert layer.momentum == pytest.approx(1.0 - e["momentum"])  # PyTorch convention
        assert layer.eps == pytest.approx(e["epsilon"])
    bn1, bn2 = km.layers
    assert bn1.producer is not None and bn1.producer.kind == "conv" and not bn1.producer.has_bias
    assert bn2.producer is not None and bn2.producer.kind == "activation"  # Conv2D(activation=relu)
    assert km.weights["logits"]["kernel"].shape == (4, 3)


def test_keras_fixtures_doctor() -> None:
    pytest.importorskip("h5py")
    for suffix in (".keras", ".h5"):
        never = diagnose_layers(read_keras(KERAS / f"never_updated{suffix}").layers)
        assert [f.layer for f in never.by_id("bn-stats-initial")] == ["bn1", "bn2"]
        assert never.exit_code == 2
        assert not never.by_id("bn-stats-initial")[0].fixable  # no recalibration for Keras here
        trained = diagnose_layers(read_keras(KERAS / f"trained{suffix}").layers)
        assert trained.exit_code == 0
        assert trained.ids() == {"bn-after-activation"}
        # Keras' own momentum/eps defaults are not "suspicious" in a Keras file
        assert not {"bn-momentum-keras", "bn-eps-keras"} & trained.ids()


def test_keras2_dialect_sequential_h5(tmp_path: Path) -> None:
    """A file in Keras 2's layout: Sequential config, weight names with ':0', nested groups."""
    h5py = pytest.importorskip("h5py")
    config = {
        "class_name": "Sequential",
        "config": {
            "name": "seq",
            "layers": [
                {
                    "class_name": "Dense",
                    "config": {
                        "name": "dense",
                        "units": 3,
                        "use_bias": True,
                        "activation": "linear",
                    },
                },
                {
                    "class_name": "BatchNormalization",
                    "config": {
                        "name": "bn",
                        "axis": -1,
                        "momentum": 0.99,
                        "epsilon": 0.001,
                        "center": True,
                        "scale": True,
                    },
                },
                {"class_name": "Activation", "config": {"name": "act", "activation": "relu"}},
            ],
        },
    }
    path = tmp_path / "k2.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        f.attrs["keras_version"] = b"2.13.1"
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = [b"dense", b"bn", b"act"]
        d = mw.create_group("dense")
        d.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        d.create_dataset("dense/kernel:0", data=np.ones((2, 3), np.float32))
        d.create_dataset("dense/bias:0", data=np.zeros(3, np.float32))
        b = mw.create_group("bn")
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        b.attrs["weight_names"] = [f"bn/{n}:0".encode() for n in names]
        for i, n in enumerate(names):
            b.create_dataset(f"bn/{n}:0", data=np.full(3, float(i), np.float32))
        mw.create_group("act").attrs["weight_names"] = np.array([], dtype=float)
    km = read_keras(path)
    (bn,) = km.layers
    assert km.keras_version == "2.13.1"
    assert bn.running_mean.tolist() == [2.0] * 3 and bn.running_var.tolist() == [3.0] * 3
    assert bn.producer is not None and bn.producer.kind == "linear" and bn.producer.has_bias
    report = diagnose_layers(km.layers)
    assert "bn-bias-before" in report.ids()


def test_keras2_functional_inbound_nodes() -> None:
    entry = {"inbound_nodes": [[["conv", 0, 0, {}]]]}
    assert _inbound(entry) == ["conv"]
    cfg = {
        "class_name": "Functional",
        "config": {
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "in",
                    "config": {"name": "in"},
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Conv2D",
                    "name": "conv",
                    "config": {"name": "conv"},
                    "inbound_nodes": [[["in", 0, 0, {}]]],
                },
            ]
        },
    }
    assert [layer.inputs for layer in _flatten_layers(cfg)] == [[], ["in"]]


def test_not_a_keras_file(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    bad = tmp_path / "x.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"x\.keras"):
        read_keras(bad)


# ---- ONNX --------------------------------------------------------------------------------------


def _bn_onnx(path: Path, *, training_mode: int, mean: float, var: float, gamma: float) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    c = 4
    inits = [
        numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((c, 3, 3, 3)).astype(np.float32), "w"
        ),
        numpy_helper.from_array(np.full(c, gamma, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(c, np.float32), "b"),
        numpy_helper.from_array(np.full(c, mean, np.float32), "mean"),
        numpy_helper.from_array(np.full(c, var, np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization",
            ["r", "scale", "b", "mean", "var"],
            ["y"],
            name="bn",
            epsilon=1e-5,
            momentum=0.9,
            training_mode=training_mode,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.save(model, str(path))


def test_onnx_planted_defects(tmp_path: Path) -> None:
    clean, train, init = tmp_path / "clean.onnx", tmp_path / "train.onnx", tmp_path / "init.onnx"
    _bn_onnx(clean, training_mode=0, mean=0.3, var=2.0, gamma=1.2)
    _bn_onnx(train, training_mode=1, mean=0.3, var=2.0, gamma=1.2)
    _bn_onnx(init, training_mode=0, mean=0.0, var=1.0, gamma=1.2)
    t = load_target(str(clean))
    (layer,) = t.layers
    assert t.kind == "onnx" and layer.name == "bn"
    assert layer.momentum == pytest.approx(0.1) and layer.input_shape == (4, 8, 8)
    assert layer.producer is not None and layer.producer.kind == "activation"
    report = diagnose_layers(t.layers, mode_recorded=t.mode_recorded)
    assert report.exit_code == 0 and report.ids() == {"bn-after-activation"}
    tr = load_target(str(train))
    assert "bn-train-mode" in diagnose_layers(tr.layers, mode_recorded=True).ids()
    it = load_target(str(init))
    assert diagnose_layers(it.layers).by_id("bn-stats-initial")[0].layer == "bn"


def test_onnx_export_reads_back_the_statistics(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from normlab.bn.export import export_onnx
    from normlab.models import build_model

    model = build_model("resnet20", 3, placement="post")
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8))
    model.eval()
    export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", fold=False)
    layers = load_target(str(tmp_path / "m.onnx")).layers
    assert len(layers) >= 9  # the post-placement BNs after a ReLU stay BatchNormalization nodes
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for layer in layers:
        match = [
            m
            for m in bns
            if m.num_features == layer.num_features
            and torch.allclose(layer.running_mean.float(), m.running_mean)
            and torch.allclose(layer.running_var.float(), m.running_var)
            and torch.allclose(layer.weight.float(), m.weight)
        ]
        assert len(match) == 1, layer.name
        assert layer.momentum == pytest.approx(0.1)
        assert layer.producer is not None and layer.producer.kind == "activation"


# ---- PyTorch files ---------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_state_dict_without_architecture_gives_statistics_checks(tmp_path: Path) -> None:
    model = _net()
    with torch.no_grad():
        model[1].weight.mul_(2.0)  # trained affine, statistics never updated
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "sd.pt")
    t = load_target(str(tmp_path / "sd.pt"))
    assert t.kind == "tensors" and t.model is None
    report = diagnose_layers(t.layers, graph_method=t.graph_method)
    assert [f.layer for f in report.by_id("bn-stats-initial")] == ["1"]
    assert "graph-unavailable" in report.ids()


def test_state_dict_with_arch_and_callable(tmp_path: Path) -> None:
    model = _net()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    t = load_target(str(tmp_path / "ckpt.pth"), arch=f"{__name__}:_net")
    assert t.kind == "state_dict" and isinstance(t.model, nn.Sequential)
    t2 = load_target(f"{__name__}:_net")
    assert t2.kind == "callable" and not t2.mode_recorded
    t3 = load_target("normlab:resnet20", num_classes=3)
    assert t3.model is not None and t3.model.fc.out_features == 3
    with pytest.raises(ConfigError, match="no attribute"):
        load_target(f"{__name__}:nothing_here")
    with pytest.raises(DataError, match="does not fit"):
        load_target(str(tmp_path / "ckpt.pth"), arch="normlab:resnet20")


def test_pickled_module_needs_unsafe_load(tmp_path: Path) -> None:
    model = _net().train()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(NormlabError, match="--unsafe-load"):
        load_target(str(tmp_path / "whole.pt"))
    t = load_target(str(tmp_path / "whole.pt"), unsafe_load=True)
    assert t.kind == "module" and t.mode_recorded and t.model is not None and t.model.training


def test_missing_and_odd_targets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_target(str(tmp_path / "nope.pt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not a normlab run"):
        load_target(str(tmp_path / "dir"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DataError, match="neither a model"):
        load_target(str(tmp_path / "list.pt"))


# ---- sharded checkpoints (an index JSON naming several weight files) -------------------------


def _bnnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


def _sharded(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path, Path, Path]:
    """A trained-looking state_dict (BN 1 with statistics never updated: a doctor error) as one
    .safetensors file, and as two-shard safetensors and .bin checkpoints with their indexes."""
    from safetensors.torch import save_file

    model = _bnnet()
    with torch.no_grad():
        model[1].weight.mul_(2.0)
        model[4].running_mean.uniform_(-1, 1)
        model[4].running_var.uniform_(0.5, 2)
        model[4].num_batches_tracked.fill_(100)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    keys = list(state)
    parts = {"a": keys[: len(keys) // 2], "b": keys[len(keys) // 2 :]}
    indexes = []
    for fmt in ("safetensors", "bin"):
        folder = tmp_path / fmt
        folder.mkdir()
        weight_map = {}
        for part, names in parts.items():
            shard = f"model-{part}.{fmt}"
            tensors = {k: state[k] for k in names}
            if fmt == "safetensors":
                save_file(tensors, folder / shard)
            else:
                torch.save(tensors, folder / shard)
            weight_map.update({k: shard for k in names})
        name = (
            "model.safetensors.index.json"
            if fmt == "safetensors"
            else "pytorch_model.bin.index.json"
        )
        index = folder / name
        index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
        indexes.append(index)
    return state, tmp_path / "model.safetensors", indexes[0], indexes[1]


def test_single_safetensors_and_sharded_indexes_load_the_same_tensors(tmp_path: Path) -> None:
    state, single, st_index, bin_index = _sharded(tmp_path)
    for spec in (single, st_index, bin_index):
        t = load_target(str(spec))
        assert t.kind == "tensors" and t.state_dict is not None
        assert set(t.state_dict) == set(state)
        assert all(torch.equal(t.state_dict[k], v) for k, v in state.items()), spec.name
    t = load_target(str(bin_index), arch=f"{__name__}:_bnnet")
    assert t.kind == "state_dict" and t.model is not None
    assert any("2 shard file(s)" in n for n in load_target(str(st_index)).notes)


def _doctor(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    from normlab.cli import main

    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_sharded_doctor_fold_convert_recalibrate_equal_the_single_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: every command gives on the shards what it gives on the unsharded file."""
    from normlab.cli import main

    _, single, st_index, bin_index = _sharded(tmp_path)
    arch = ["--arch", f"{__name__}:_bnnet", "--input-shape", "3,12,12"]

    def findings(report: dict, spec: Path) -> str:  # fix texts name the target: neutralise that
        return json.dumps(report["findings"]).replace(str(spec), "TARGET")

    code, ref = _doctor(capsys, ["doctor", str(single), *arch])
    assert code == 2 and "bn-stats-initial" in {f["id"] for f in ref["findings"]}
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    outputs: dict[str, list[torch.Tensor]] = {}
    for spec in (single, st_index, bin_index):
        code, rep = _doctor(capsys, ["doctor", str(spec), *arch])
        assert code == 2 and findings(rep, spec) == findings(ref, single), spec.name
        out = tmp_path / f"{spec.name}.out"
        outs = []
        for argv in (
            ["fold", str(spec), f"{out}.fold.pt", *arch, "--no-timing"],
            ["convert", str(spec), f"{out}.conv.pt", *arch, "--op", "frozen-bn"],
        ):
            assert main(argv) == 0, argv
            capsys.readouterr()
            model = load_target(argv[2], unsafe_load=True).model
            assert model is not None
            with torch.no_grad():
                outs.append(model.eval()(x))
        recal = f"{out}.recal.pt"
        argv = ["recalibrate", str(spec), *arch, "--data", "synthetic", "--batches", "2"]
        assert main([*argv, "--out", recal]) == 0
        capsys.readouterr()
        model = load_target(recal, arch=f"{__name__}:_bnnet").model
        assert model is not None
        with torch.no_grad():
            outs.append(model.eval()(x))
        outputs[spec.name] = outs
    ref_outs = outputs[single.name]
    for name, outs in outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs, strict=True)), name


def _rewrite_index(index: Path, edit: object) -> None:
    data = json.loads(index.read_text())
    edit(data["weight_map"])  # type: ignore[operator]
    index.write_text(json.dumps(data))


def test_sharded_index_errors_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state, _, st_index, _ = _sharded(tmp_path)
    folder = st_index.parent
    first = next(iter(state))

    def expect(pattern: str) -> None:
        with pytest.raises(DataError, match=pattern):
            load_target(str(st_index))

    original = st_index.read_text()
    _rewrite_index(st_index, lambda m: m.update({first: "model-c.safetensors"}))
    expect(r"shard 'model-c.safetensors' is missing")
    st_index.write_text(original)
    _rewrite_index(st_index, lambda m: m.update({first: "../model.safetensors"}))
    expect(r"outside the index's folder")
    st_index.write_text(original)
    _rewrite_index(st_index, lambda m: m.update({first: "/etc/passwd"}))
    expect(r"outside the index's folder")
    st_index.write_text(original)
    # the same key in both shard files
    shard_b = folder / "model-b.safetensors"
    from safetensors.torch import load_file

    b = load_file(shard_b)
    save_file({**b, first: state[first]}, shard_b)
    expect(r"is in two shards, .model-a.safetensors. and .model-b.safetensors.")
    save_file(b, shard_b)
    # a key the index lists in a shard that lacks it
    _rewrite_index(st_index, lambda m: m.update({"extra.weight": "model-b.safetensors"}))
    expect(r"shard 'model-b.safetensors' lacks 'extra.weight'")
    st_index.write_text(original)
    # a key listed twice in the JSON text (json.loads would keep only the last)
    text = original.replace(
        '"weight_map": {', f'"weight_map": {{"{first}": "model-b.safetensors", ', 1
    )
    st_index.write_text(text)
    expect(r"listed twice")
    for text, pattern in (
        ("not json", "not valid JSON"),
        ("[1, 2]", "a JSON list"),
        ('{"metadata": {}}', "no 'weight_map'"),
        ('{"weight_map": {"a": 3}}', "not a file name"),
    ):
        st_index.write_text(text)
        expect(pattern)
    st_index.write_text(original)
    assert load_target(str(st_index)).state_dict is not None


def test_an_unsafe_shard_refuses_the_whole_checkpoint(tmp_path: Path) -> None:
    import os

    from normlab.bn.scan import UnsafeFileError

    class _System:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'SENTINEL'}",))

    _, _, _, bin_index = _sharded(tmp_path)
    shard = bin_index.parent / "model-b.bin"
    tensors = torch.load(shard, weights_only=True)
    torch.save({**tensors, "evil": _System()}, shard)
    with pytest.raises(UnsafeFileError, match="unsafe-pickle-global") as info:
        load_target(str(bin_index))
    assert "model-b.bin" in info.value.items[0].location
    assert not (tmp_path / "SENTINEL").exists()


def test_an_h5_file_that_loops_libhdf5_is_a_named_error_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by tests/test_bn_fuzz.py: 8 bytes changed in trained.h5 send libhdf5 (1.14, in
    h5py 3.16) into an endless loop reading the model_config attribute, in C, where no signal
    reaches. Reads run in a child process bounded in time; a libhdf5 that does not loop gives
    a named error too."""
    import time

    from normlab.bn import keras_file
    from normlab.cli import main

    data = bytearray((KERAS / "trained.h5").read_bytes())
    for offset, value in (
        (1945, 94), (7013, 157), (9904, 100), (9953, 230),
        (11160, 174), (17819, 111), (27717, 64), (32417, 158),
    ):  # fmt: skip
        data[offset] = value
    (tmp_path / "loops.h5").write_bytes(bytes(data))
    monkeypatch.setattr(keras_file, "H5_SECONDS", 3.0)
    start = time.perf_counter()
    assert main(["doctor", str(tmp_path / "loops.h5")]) == 2
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err
    assert err.startswith("normlab doctor: error: ") and "loops.h5" in err
