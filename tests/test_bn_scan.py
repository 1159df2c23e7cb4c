"""Unsafe content is a finding: :mod:`normlab.bn.scan` and its wiring into the loaders and CLI.

Every malicious file is built here, by the test, and never loaded unsafely: each would create a
sentinel file (or evaluate code) if anything unpickled, unmarshalled or imported it, and every
test that touches one asserts the sentinel is still absent. The ids asserted are the exact sets.

Why the scan walks pickles itself (``pickletools.genops``) instead of calling a scanner, from an
evaluation of the three well-kept ones (none executes anything; all walk opcodes too):

* picklescan 1.0.5 (MIT, no dependencies): ``scan_pickle_bytes`` keeps every opcode of a pickle
  in a list: an 8 MiB pickle of one-byte opcodes took 8.3 s and 865 MB of memory (genops
  streaming: 3.6 s, 26 MB); its verdicts are a denylist ("dangerous") plus "suspicious" for the
  rest, not torch's allowlist; it logs WARNING/ERROR lines to stderr (a CLI's output).
  It serves below as a second opinion: whatever it calls dangerous, the scan reports too.
* modelscan 0.8.8 (Apache-2.0): pulls in click, rich, tomlkit and numpy, caps Python < 3.13,
  and is a CLI/report framework around the same opcode walk with a denylist.
* fickling 0.1.12 (LGPL-3.0): decompiles pickles into a Python AST (heavier, memory grows with
  the pickle), licence less permissive than the project's.

The allowlist must be torch's weights-only one, and the framing torch's own (every ``.pkl`` of a
zip file, the 5 pickles of a legacy file); both are small code, tested here.
"""

from __future__ import annotations

import base64
import json
import marshal
import os
import pickle
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.bn import load_target
from normlab.bn import scan as scan_mod
from normlab.bn.scan import UNSAFE_CHECKS, UnsafeFileError, unsafe_findings
from normlab.cli import main

KERAS = Path(__file__).parent / "fixtures" / "keras"


class _System:
    """Pickles as a call of os.system that would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


class _Eval:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.path)!r}, 'w')",))


def _ids(path: Path) -> set[str]:
    return {item.id for item in unsafe_findings(path)}


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "a malicious file was executed"


def _evil_torch_files(tmp_path: Path, sentinel: Path) -> dict[str, Path]:
    state = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
    files = {
        "zip": tmp_path / "evil_zip.pt",
        "legacy": tmp_path / "evil_legacy.pt",
        "pickle4": tmp_path / "evil_p4.pt",
    }
    torch.save({**state, "x": _System(sentinel)}, files["zip"])
    torch.save(
        {**state, "x": _Eval(sentinel)}, files["legacy"], _use_new_zipfile_serialization=False
    )
    with open(files["pickle4"], "wb") as fh:  # protocol 4: STACK_GLOBAL with memoised names
        pickle.dump({"x": _System(sentinel), "y": _System(sentinel)}, fh, protocol=4)
    return files


# ---- pickles -------------------------------------------------------------------------------------


def test_pickle_globals_found_in_zip_legacy_and_protocol_4(tmp_path: Path, sentinel: Path) -> None:
    files = _evil_torch_files(tmp_path, sentinel)
    for kind, path in files.items():
        items = unsafe_findings(path)
        assert {i.id for i in items} == {"unsafe-pickle-global"}, kind
        named = " ".join(i.message for i in items)
        assert ("system" in named) if kind != "legacy" else ("builtins.eval" in named), kind
    zip_item = unsafe_findings(files["zip"])[0]
    assert "data.pkl" in zip_item.location and "byte" in zip_item.location


def test_clean_tensor_files_have_no_findings(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    sd = model.state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    # a normlab-style checkpoint with optimizer state, numbers, strings and nested containers
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    ckpt = {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "note": "x", "t": (1, 2.5)}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    for name in ("sd.pt", "legacy.pt", "ckpt.pt", "m.safetensors"):
        assert unsafe_findings(tmp_path / name) == [], name
    for fixture in KERAS.glob("*.*"):
        if fixture.suffix in (".keras", ".h5"):
            assert unsafe_findings(fixture) == [], fixture.name


def test_computed_and_extension_imports_are_flagged(tmp_path: Path) -> None:
    # STACK_GLOBAL whose name is not a literal string (a memo entry that holds no string); and
    # an EXT1 copyreg code: the scan cannot tell what they import, so it says so
    computed = b"\x80\x04\x8c\x02osh\x05\x93."
    (tmp_path / "computed.pt").write_bytes(computed)
    (tmp_path / "ext.pt").write_bytes(b"\x80\x02\x82\x01.")
    for name, needle in (("computed.pt", "<computed>"), ("ext.pt", "copyreg extension 1")):
        items = unsafe_findings(tmp_path / name)
        assert [i.id for i in items] == ["unsafe-pickle-global"], name
        assert needle in items[0].message


def test_python2_names_are_mapped_like_the_unpickler(tmp_path: Path) -> None:
    # __builtin__.set is builtins.set (allowed); __builtin__.eval is builtins.eval (not)
    ok = b"\x80\x02c__builtin__\nset\n)\x85R."
    bad = b"\x80\x02c__builtin__\neval\n)\x85R."
    (tmp_path / "ok.pt").write_bytes(ok)
    (tmp_path / "bad.pt").write_bytes(bad)
    assert unsafe_findings(tmp_path / "ok.pt") == []
    assert "builtins.eval" in unsafe_findings(tmp_path / "bad.pt")[0].message


def test_pickle_scan_memory_is_streaming(tmp_path: Path) -> None:
    # 512 KiB of one-byte opcodes (256k ops): a scanner that lists the ops needs > 25 MB
    data = b"\x80\x04" + b"N0" * (2**18) + b"N."
    (tmp_path / "long.pt").write_bytes(data)
    tracemalloc.start()
    try:
        assert unsafe_findings(tmp_path / "long.pt") == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak


def test_opcode_and_size_limits_are_findings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save({"w": torch.zeros(4)}, tmp_path / "sd.pt")
    monkeypatch.setattr(scan_mod, "MAX_PICKLE_OPS", 5)
    assert _ids(tmp_path / "sd.pt") == {"scan-limit-exceeded"}
    monkeypatch.setattr(scan_mod, "MAX_PICKLE_OPS", 10**7)
    # a zip bomb: a deflated member far larger than the read limit (here lowered to 1 MiB)
    monkeypatch.setattr(scan_mod, "MAX_READ", 2**20)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02N." + b"\0" * (4 * 2**20))
    items = unsafe_findings(bomb)
    assert [i.id for i in items] == ["scan-limit-exceeded"]
    assert "data.pkl" in items[0].location
    keras_bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(keras_bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\0" * (4 * 2**20))
    assert _ids(keras_bomb) == {"scan-limit-exceeded"}
    assert main(["doctor", str(keras_bomb)]) == 2


def test_agrees_with_picklescan(tmp_path: Path, sentinel: Path) -> None:
    """A second opinion: every global picklescan calls dangerous, the scan reports too."""
    scanner = pytest.importorskip("picklescan.scanner")
    import logging

    logging.getLogger("picklescan").setLevel(logging.CRITICAL)
    for kind, path in _evil_torch_files(tmp_path, sentinel).items():
        with open(path, "rb") as fh:
            result = scanner.scan_pytorch(fh, str(path)) if kind != "pickle4" else None
        if result is None:
            with open(path, "rb") as fh:
                result = scanner.scan_pickle_bytes(fh, str(path))
        dangerous = {  # in the unpickler's spelling (__builtin__.eval is builtins.eval)
            scan_mod._mapped(g.module, g.name)
            for g in result.globals
            if g.safety.value != "innocuous"
        }
        assert dangerous, kind
        ours = " ".join(i.message for i in unsafe_findings(path))
        for name in dangerous:
            assert name in ours, (kind, name)


# ---- Keras ---------------------------------------------------------------------------------------


def _evil_keras_config(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    code = base64.b64encode(marshal.dumps((lambda x: x).__code__)).decode()
    layers = config["config"]["layers"]
    layers.append(
        {
            "module": "os",
            "class_name": "system",
            "config": {"name": "evil"},
            "registered_name": None,
            "name": "evil",
            "inbound_nodes": [],
        }
    )
    layers.append(
        {
            "module": "keras.layers",
            "class_name": "Lambda",
            "config": {
                "name": "lam",
                "function": {
                    "class_name": "__lambda__",
                    "config": {"code": code, "defaults": None, "closure": None},
                },
            },
            "registered_name": None,
            "name": "lam",
            "inbound_nodes": [],
        }
    )
    return config


def _evil_keras(tmp_path: Path) -> Path:
    src = zipfile.ZipFile(KERAS / "trained.keras")
    config = _evil_keras_config(json.loads(src.read("config.json")))
    out = tmp_path / "evil.keras"
    with zipfile.ZipFile(out, "w") as zf:
        for name in src.namelist():
            zf.writestr(name, json.dumps(config) if name == "config.json" else src.read(name))
    return out


def _evil_h5(tmp_path: Path) -> Path:
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "evil.h5"
    shutil.copy(KERAS / "trained.h5", out)
    with h5py.File(out, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        h5.attrs["model_config"] = json.dumps(_evil_keras_config(config))
    return out


KERAS_IDS = {"keras-foreign-object", "keras-lambda", "keras-marshalled-code"}


def test_keras_foreign_lambda_and_bytecode(tmp_path: Path) -> None:
    for path in (_evil_keras(tmp_path), _evil_h5(tmp_path)):
        items = unsafe_findings(path)
        assert {i.id for i in items} == KERAS_IDS, path.name
        foreign = next(i for i in items if i.id == "keras-foreign-object")
        assert "os.system" in foreign.message and "layers[" in foreign.location


def test_keras2_lambda_and_foreign_function_and_custom_object(tmp_path: Path) -> None:
    config = {
        "class_name": "Sequential",
        "config": {
            "layers": [
                {
                    "class_name": "Lambda",
                    "config": {
                        "name": "l",
                        "function": ["YmFzZTY0", None, None],
                        "function_type": "lambda",
                    },
                },
                {
                    "class_name": "Dense",
                    "config": {"name": "d", "activation": "relu"},
                    "registered_name": "mypkg>Dense2",
                },
                {
                    "class_name": "Activation",
                    "config": {
                        "activation": {
                            "module": "builtins",
                            "class_name": "function",
                            "config": "eval",
                            "registered_name": "eval",
                        }
                    },
                },
            ]
        },
    }
    items = list(scan_mod._keras_config_items(config, "model_config"))
    assert {i.id for i in items} == KERAS_IDS
    messages = " ".join(i.message for i in items)
    assert "builtins.eval" in messages and "mypkg>Dense2" in messages


# ---- ONNX ----------------------------------------------------------------------------------------


def _onnx_with_external(path: Path, location: str) -> None:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx is not None


def test_onnx_external_data_outside_the_folder(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "w.bin").write_bytes(b"\0" * 16)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    (model_dir / "link.bin").symlink_to(tmp_path / "outside.bin")
    cases = {
        "../../etc/passwd": True,
        "/etc/passwd": True,
        "link.bin": True,  # a symlink that leads out
        "w.bin": False,
        "sub/../w.bin": False,
    }
    for i, (location, outside) in enumerate(cases.items()):
        path = model_dir / f"m{i}.onnx"
        _onnx_with_external(path, location)
        expected = {"onnx-external-data-outside"} if outside else set()
        assert _ids(path) == expected, location


# ---- wiring: doctor reports, the other commands refuse -------------------------------------------


def test_doctor_reports_unsafe_files_with_exit_2_and_runs_nothing(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path = tmp_path / "evil.onnx"
    _onnx_with_external(onnx_path, "../../etc/passwd")
    cases = {
        **{p: {"unsafe-pickle-global"} for p in _evil_torch_files(tmp_path, sentinel).values()},
        _evil_keras(tmp_path): KERAS_IDS,
        _evil_h5(tmp_path): KERAS_IDS,
        onnx_path: {"onnx-external-data-outside"},
    }
    for path, ids in cases.items():
        assert main(["doctor", str(path), "--json"]) == 2, path.name
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        assert {f["id"] for f in report["findings"]} == ids, path.name
        assert all(f["severity"] == "error" for f in report["findings"])
        assert report["checks"] == ["file-scan"] and "was not loaded" in captured.err
        assert "Traceback" not in captured.err
    assert set(UNSAFE_CHECKS) >= {"unsafe-pickle-global", *KERAS_IDS}


def test_the_doctor_registry_holds_the_file_checks_and_finds_the_same(
    tmp_path: Path, sentinel: Path
) -> None:
    """Each unsafe-content id is a registered file check of the doctor (in CHECKS and the
    docs table), and the registry's file checks on a file give the scan's ids."""
    from normlab.bn.checks import all_checks
    from normlab.bn.diagnose import CHECKS, file_findings

    assert {c.id for c in all_checks("file")} == set(UNSAFE_CHECKS)
    assert set(UNSAFE_CHECKS) <= set(CHECKS)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "doctor_checks.md").read_text()
    assert all(f"`{i}`" in docs for i in UNSAFE_CHECKS)
    onnx_path = tmp_path / "evil.onnx"
    _onnx_with_external(onnx_path, "../../etc/passwd")
    for path in [_evil_keras(tmp_path), onnx_path, *_evil_torch_files(tmp_path, sentinel).values()]:
        found = file_findings(path)
        assert found and {f.id for f in found} == _ids(path), path.name
        assert all(f.severity == "error" for f in found)
    assert file_findings(tmp_path / "missing.pt") == []
    assert not sentinel.exists()


@pytest.mark.parametrize("command", ["fold", "recalibrate", "convert"])
def test_other_commands_refuse_naming_the_finding(
    command: str, tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = _evil_torch_files(tmp_path, sentinel)["zip"]
    out = str(tmp_path / "out.pt")
    argv = {
        "fold": ["fold", str(evil), out, "--input-shape", "3,8,8"],
        "recalibrate": ["recalibrate", str(evil), "--data", "synthetic", "--out", out],
        "convert": ["convert", str(evil), out, "--op", "frozen-bn"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "unsafe-pickle-global" in err and "system" in err
    assert "Traceback" not in err and not Path(out).exists()
    with pytest.raises(UnsafeFileError) as info:
        load_target(str(evil))
    assert [i.id for i in info.value.items] == ["unsafe-pickle-global"]


def test_pickled_module_is_refused_then_checked_with_unsafe_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    torch.save(model, tmp_path / "whole.pt")
    items = unsafe_findings(tmp_path / "whole.pt")
    assert {i.id for i in items} == {"unsafe-pickle-global"}
    assert any("torch.nn.modules.batchnorm.BatchNorm2d" in i.message for i in items)
    assert main(["doctor", str(tmp_path / "whole.pt")]) == 2
    assert "--unsafe-load" in capsys.readouterr().err
    code = main(["doctor", str(tmp_path / "whole.pt"), "--unsafe-load", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == report["exit_status"] and "file-scan" not in report["checks"]
    assert any("--unsafe-load was given" in n for n in report["notes"])
    target = load_target(str(tmp_path / "whole.pt"), unsafe_load=True)
    assert target.kind == "module" and {i.id for i in target.unsafe} == {"unsafe-pickle-global"}


def test_sizes_and_memory_on_a_huge_safetensors_header(tmp_path: Path) -> None:
    from normlab.errors import DataError

    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge\.safetensors"):
            load_target(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
