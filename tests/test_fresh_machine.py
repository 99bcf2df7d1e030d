"""What a newcomer meets on a fresh machine: the README block is what CI runs, `hal conformance`
certifies every usable backend and says why it skipped the others, a scaffolded backend takes
nothing until filled, misspelt variables warn, piping into `head` is quiet, meta tensors get a
typed error, and plugins that break their contract stay contained."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hal
from hal.cli import main
from hal.conformance.catalogue import select_cases
from hal.conformance.runner import run_backend

ROOT = Path(__file__).resolve().parents[1]
# The first code block after the heading that names a fresh machine (the heading's own line only,
# as .ci/run's awk reads it: prose elsewhere may say "fresh machine" too).
README_BLOCK = re.compile(r"^#+ [^\n]*[Ff]resh machine[^\n]*\n.*?```\w*\n(.*?)```", re.S | re.M)


def _readme_commands() -> list[str]:
    block = README_BLOCK.search((ROOT / "README.md").read_text()).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_readme_block_is_two_commands_install_plus_main_job_then_tests():
    commands = _readme_commands()
    assert commands == ["scripts/install.sh && hal conformance", "pytest"]
    assert os.access(ROOT / "scripts" / "install.sh", os.X_OK)


def test_ci_runs_the_readme_block_and_nothing_else():
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run extracts the block from README.md and runs it: the two cannot drift apart.
    extracted = subprocess.run(
        ["awk", r"f==0 && /^#+ .*[Ff]resh machine/ {f=1; next} f==1 && /^```/ {f=2; next} f==2 && /^```/ {exit} f==2 {print}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert [c.split("#", 1)[0].strip() for c in extracted.splitlines() if c.split("#", 1)[0].strip()] == _readme_commands()
    assert "README.md" in ci and 'bash -euo pipefail -c "$block"' in ci
    code = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for forbidden in ("pip install", "pytest", "hal conformance", "apt-get"):
        assert not any(forbidden in line for line in code), f".ci/run runs {forbidden!r} itself instead of through the README"


def test_install_script_installs_the_opencl_runtime_and_keeps_an_installed_torch():
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "pocl-opencl-icd" in script and "chromium" in script
    assert "import torch" in script and "HAL_TORCH_INDEX_URL" in script
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any("pocl-binary-distribution" in dep for deps in extras.values() for dep in deps)


def _hal(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HAL_BACKEND", "TRITON_INTERPRET", "HAL_ROCM"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "hal.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


def test_the_native_kernel_sources_and_headers_are_package_data():
    """A non-editable install must ship every file the cpu backend's build reads (an editable one,
    as here, would not notice a header left out)."""
    import fnmatch
    import tomllib

    from hal.backends.cpu import native

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hal.backends.cpu"]
    package = Path(native.__file__).parent
    for path in (*native.SOURCES, *native.HEADERS):
        relative = path.relative_to(package).as_posix()
        assert path.exists() and any(fnmatch.fnmatch(relative, glob) for glob in globs), relative
    shipped = {p.name for glob in globs for p in package.glob(glob)}
    included = {name for source in native.SOURCES for name in re.findall(r'#include "([^"]+)"', source.read_text())}
    assert included <= shipped and included <= {h.name for h in native.HEADERS}, included


def test_the_compiled_checks_source_is_package_data():
    import fnmatch
    import tomllib

    from hal import compiled_checks

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hal"]
    relative = compiled_checks.SOURCE.relative_to(Path(compiled_checks.__file__).parent).as_posix()
    assert compiled_checks.SOURCE.exists() and any(fnmatch.fnmatch(relative, glob) for glob in globs), relative


def test_conformance_without_arguments_covers_every_usable_backend_and_names_the_skipped(tmp_path):
    result = _hal("conformance", "--op", "per_token_cast_to_fp8", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Conformance summary" in out and "reference" in out
    triton_installed = __import__("importlib").util.find_spec("triton") is not None
    if triton_installed and not torch.cuda.is_available():
        assert re.search(r"cuda\s.*│\s*simulated", out) and re.search(r"rocm\s.*│\s*simulated", out)
        assert "not a hardware pass" in out
    # Every discovered backend is either in the summary with a verdict or on a 'not run' line.
    report = json.loads(_hal("backends", "--json").stdout)
    for backend in report["backends"]:
        assert backend["name"] in out


def test_backends_json_piped_into_head_exits_quietly():
    command = f"{sys.executable} -m hal.cli backends --json | head -c 20"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_a_misspelt_operator_variable_warns_once_naming_the_closest_operator(monkeypatch, caplog):
    from hal import selection

    monkeypatch.setenv("HAL_BACKEND_MLA_DECOD", "reference")
    monkeypatch.setenv("HAL_BACKEND_MLA", "reference")
    selection._warn_unknown_variables_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hal"):
        hal.per_token_cast_to_fp8(torch.randn(2, 128))
        hal.per_token_cast_to_fp8(torch.randn(2, 128))
    warnings = [r.getMessage() for r in caplog.records if "names no operator" in r.getMessage()]
    assert len(warnings) == 2  # one per variable, once per process
    assert all("did you mean HAL_BACKEND_MLA_DECODE?" in w for w in warnings)


def test_hal_backends_lists_honoured_and_ignored_variables(monkeypatch, capsys):
    monkeypatch.setenv("HAL_BACKEND_GEMM_FP8_NT", "reference")
    monkeypatch.setenv("HAL_BACKEND_GEMM", "reference")
    assert main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["environment"] == {"HAL_BACKEND_GEMM_FP8_NT": "reference"}
    assert report["ignored_environment"]["HAL_BACKEND_GEMM"]["did_you_mean"].startswith("HAL_BACKEND_")


@pytest.mark.parametrize(
    "call",
    [
        lambda: hal.per_token_cast_to_fp8(torch.empty(4, 128, device="meta")),
        lambda: hal.per_block_cast_to_fp8(torch.empty(128, 128, device="meta")),
        lambda: hal.get_dispatch_layout(torch.zeros(4, 2, dtype=torch.int64, device="meta"), 8, 2),
    ],
)
def test_meta_tensors_get_a_typed_error(call):
    with pytest.raises(hal.DeviceError, match="meta device"):
        call()


def test_a_plugin_with_a_bad_info_type_is_contained(install_plugins, capsys):
    install_plugins({"bad_info": "bad_info"})
    bad = hal.get_backend("bad_info")
    assert not bad.available and "returned dict, not BackendInfo" in bad.availability().reason
    assert hal.select("gemm_fp8_nt", "cpu").backend.name != "bad_info"
    assert main(["backends"]) == 0


def test_a_hanging_availability_probe_is_bounded(install_plugins, monkeypatch):
    monkeypatch.setenv("HAL_PROBE_TIMEOUT_S", "1")
    install_plugins({"hanging_probe": "hanging_probe"})
    availability = hal.get_backend("hanging_probe").availability()
    assert not availability.available and "did not answer within 1 s" in availability.reason
    assert hal.select("gemm_fp8_nt", "cpu").backend.name != "hanging_probe"


def test_an_untouched_template_claims_nothing(tmp_path, install_plugins, monkeypatch):
    target = tmp_path / "scaffold"
    assert main(["new-backend", "acme", "--dir", str(target)]) == 0
    monkeypatch.syspath_prepend(str(target))
    install_plugins({"acme": "hal_acme.plugin"})
    acme = hal.get_backend("acme")
    assert acme.available and acme.implemented_hooks() == []
    assert sorted(acme.planned_hooks()) == sorted(op.hook for op in hal.OPERATORS.values())
    for op in hal.OPERATORS.values():  # nothing taken from any other backend
        assert hal.select(op, "cpu").backend.name != "acme"
    results = run_backend("acme", select_cases(quick=True))
    assert {r.status for r in results} == {"unsupported"}
    assert all("not implemented yet" in r.reason for r in results)


def test_filling_one_template_hook_makes_exactly_that_operator_selectable(tmp_path, install_plugins, monkeypatch):
    target = tmp_path / "scaffold"
    assert main(["new-backend", "forge", "--dir", str(target)]) == 0
    plugin = target / "hal_forge" / "plugin.py"
    text = plugin.read_text()
    marked = "@hookimpl\n@not_implemented_yet  # delete this line once the body below computes per_token_cast_to_fp8\ndef hal_per_token_cast_to_fp8(x):"
    assert marked in text
    body_start = text.index(marked)
    body_end = text.index("\n\n\n", body_start)
    filled = (
        "@hookimpl\ndef hal_per_token_cast_to_fp8(x):\n"
        "    from hal.ops.fp8_quant import per_token_cast_reference\n\n    return per_token_cast_reference(x)"
    )
    plugin.write_text(text[:body_start] + filled + text[body_end:])
    monkeypatch.syspath_prepend(str(target))
    install_plugins({"forge": "hal_forge.plugin"})
    forge = hal.get_backend("forge")
    assert forge.implemented_hooks() == ["hal_per_token_cast_to_fp8"]
    monkeypatch.setenv("HAL_BACKEND", "forge")
    assert hal.select("per_token_cast_to_fp8", "cpu").backend.name == "forge"
    with pytest.raises(hal.OperatorNotSupportedError, match="does not implement"):
        hal.select("per_block_cast_to_fp8", "cpu")
    monkeypatch.delenv("HAL_BACKEND")
    results = run_backend("forge", select_cases(quick=True, ops=["per_token_cast_to_fp8", "per_block_cast_to_fp8"]))
    assert {r.op: r.status for r in results} == {"per_token_cast_to_fp8": "pass", "per_block_cast_to_fp8": "unsupported"}


def test_the_generated_package_installs_from_a_unihal_checkout(tmp_path):
    target = tmp_path / "hal-acme"
    assert main(["new-backend", "acme", "--dir", str(target)]) == 0
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(target)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    listed = subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--json"], capture_output=True, text=True, env=env, timeout=300)
    report = json.loads(listed.stdout)
    acme = next(b for b in report["backends"] if b["name"] == "acme")
    assert acme["available"] and acme["operators"] == [] and len(acme["not_implemented_yet"]) == len(hal.OPERATORS)
    assert all(pick["backend"] != "acme" for pick in report["selection"]["cpu"].values())


def test_bench_runs_the_ep_ranks_on_the_named_backend():
    from hal.ep.bench import CASES, run

    with pytest.raises(RuntimeError, match="opencl"):  # opencl has no ep_pack: every rank says so, by name
        run(2, "opencl", tokens=16, hidden=256, topk=2, experts_per_rank=2, repeats=1)
    records = run(2, "reference", tokens=16, hidden=256, topk=2, experts_per_rank=2, repeats=1)
    assert {r["backend"] for r in records} == {"reference"} and len(records) == len(CASES)
