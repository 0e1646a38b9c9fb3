"""The q8 scenario: a real int8 checkpoint served on CPU through the patched loader."""

import json

testinfra_hosts = ["ansible://moshi_servers"]

PYTHON = "/opt/moshi/venv/bin/python"


def test_served_model_is_quantized(host):
    config = json.loads(host.file("/opt/moshi/model/config.json").content_string)
    assert config["quantize"] is True


def test_bitsandbytes_is_installed_for_q8(host):
    assert (
        host.check_output(f"{PYTHON} -c 'import bitsandbytes; print(bitsandbytes.__version__)'") == "0.49.2"
    )


def test_self_test_loads_q8_in_bf16_with_float32_scales(host):
    out = host.run(f"PYTHONPATH=/opt/moshi/lib NO_TORCH_COMPILE=1 {PYTHON} -m moshi_tools.selftest")
    assert out.rc == 0, out.stderr
    assert "q8 self-test passed: scales torch.float32" in out.stdout


UNPATCH_AND_RUN = """
import pathlib, shutil, subprocess, sys, tempfile
import moshi
from moshi_tools import q8_patch
scratch = pathlib.Path(tempfile.mkdtemp())
shutil.copytree(pathlib.Path(moshi.__file__).parent, scratch / "moshi")
loader = scratch / "moshi/models/loaders.py"
loader.write_text(loader.read_text().replace(q8_patch.PATCHED, q8_patch.UNPATCHED))
run = subprocess.run([sys.executable, "-m", "moshi_tools.selftest"], capture_output=True, text=True,
                     env={"PYTHONPATH": f"{scratch}:/opt/moshi/lib", "NO_TORCH_COMPILE": "1"})
shutil.rmtree(scratch)
print(run.returncode)
print(run.stderr)
"""


def test_self_test_reproduces_the_field_error_without_the_fix(host):
    # The same self-test against an unpatched copy of the installed loader, in a scratch directory.
    host.check_output(f"cat > /tmp/unpatch_and_run.py <<'EOF'\n{UNPATCH_AND_RUN}\nEOF")
    out = host.check_output(f"PYTHONPATH=/opt/moshi/lib {PYTHON} /tmp/unpatch_and_run.py")
    returncode, _, stderr = out.partition("\n")
    assert returncode == "1"
    assert (
        "q8 self-test FAILED: RuntimeError: Expected `weight_scb` to have type float, but got bfloat16"
        in stderr
    )
