"""The one /proc/cpuinfo reader: the bf16 decision and the recorded CPU both rest on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from normlab import hostinfo
from normlab.engine.runtime import cpu_supports_bf16
from normlab.store.provenance import cpu_description

# the shape the kernel writes: tab-padded keys, one block per logical CPU, a blank line after
# each; the second block differs so a parser that reads past the first one is caught
TWO_CPUS = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\nbugs\t\t:\n\n"
    "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Some Other CPU\n"
    "flags\t\t: fpu sse2\n\n"
)


def test_the_first_processor_block_is_read_with_its_keys_unpadded():
    fields = hostinfo.parse_cpuinfo(TWO_CPUS)
    assert fields["model name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert fields["flags"].split() == ["fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"]
    assert fields["processor"] == "0" and fields["bugs"] == ""


def test_leading_blank_lines_and_lines_without_a_colon_are_skipped():
    fields = hostinfo.parse_cpuinfo("\n\nno colon here\nmodel name : X\n")
    assert fields == {"model name": "X"}


@pytest.fixture
def fake_cpuinfo(monkeypatch, tmp_path):
    """Point the reader at a file of our own (and forget what it had read)."""

    def use(text: str | None) -> None:
        path = tmp_path / "cpuinfo"
        if text is not None:
            path.write_text(text, encoding="utf-8")
        monkeypatch.setattr(hostinfo, "CPUINFO", Path(path))
        hostinfo.cpuinfo.cache_clear()
        cpu_supports_bf16.cache_clear()

    yield use
    hostinfo.cpuinfo.cache_clear()
    cpu_supports_bf16.cache_clear()


def test_the_recorded_cpu_and_the_bf16_decision_read_the_same_file(fake_cpuinfo):
    import torch

    fake_cpuinfo(TWO_CPUS)
    assert cpu_description().startswith("Intel(R) Xeon(R) Platinum 8480+ (")
    assert cpu_supports_bf16() == torch.backends.mkldnn.is_available()
    fake_cpuinfo(TWO_CPUS.replace(" amx_bf16", ""))
    assert not cpu_supports_bf16()


def test_without_a_cpuinfo_file_nothing_is_known_and_nothing_raises(fake_cpuinfo):
    fake_cpuinfo(None)
    assert hostinfo.cpuinfo() == {}
    assert hostinfo.cpu_model_name() is None and hostinfo.cpu_flags() == frozenset()
    assert not cpu_supports_bf16()
    assert cpu_description()  # falls back on platform's processor name


@pytest.mark.skipif(not hostinfo.CPUINFO.exists(), reason="no /proc/cpuinfo on this system")
def test_this_machine_s_cpuinfo_gives_a_model_name_and_flags():
    assert hostinfo.cpu_model_name()
    assert hostinfo.cpu_flags()
