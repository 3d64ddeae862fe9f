"""The README's example and test command are real: run the one, check the other is CI's."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(marker):
    m = re.search(rf"<!-- {marker} -->\s*```[a-z]*\n(.*?)```", README, re.S)
    assert m, f"README has no code block after <!-- {marker} -->"
    return m.group(1)


def test_readme_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_block("example"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("info_nce:")
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]


def test_ci_runs_the_readme_test_command():
    command = _block("test-command").strip()
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci, ".ci/run must take its command from the README"


def test_main_job_command_names_a_real_config_and_entry_point():
    command = _block("main-job").strip()
    assert "pip install -e ." in command
    train = command.split("&&")[-1].split()
    assert train[:2] == ["jaxssl", "train"]
    config = train[train.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert 'jaxssl = "jaxssl.cli:main"' in (ROOT / "pyproject.toml").read_text()
    # The README states the demo's measured result: trained vs random-initialisation kNN.
    after = README.split("<!-- /main-job -->")[1].split("##")[0]
    assert re.search(r"trained[^\n]*0\.\d+", after) and "random initialisation" in after
