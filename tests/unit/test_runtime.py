"""The process defaults every entry point applies before TensorFlow is imported."""

from __future__ import annotations

import os
import subprocess
import sys

from tumorscope.runtime import CPU_DEFAULTS, apply_cpu_defaults


def test_defaults_fill_what_is_missing():
    environ: dict[str, str] = {}
    assert apply_cpu_defaults(environ) == CPU_DEFAULTS
    assert environ["TF_ENABLE_ONEDNN_OPTS"] == "1"


def test_a_users_own_value_wins():
    environ = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert apply_cpu_defaults(environ)["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


def _through_the_cli(value: str | None, ask_tensorflow: bool) -> str:
    """TF_ENABLE_ONEDNN_OPTS as a command of the CLI sees it (and, if asked, whether TensorFlow,
    imported inside the command, turned oneDNN on), in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = value
    probe = ("from tensorflow.python.util import _pywrap_util_port as port; print(os.environ['TF_ENABLE_ONEDNN_OPTS'], "
             "port.IsMklEnabled())" if ask_tensorflow else "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    script = ("import os\n"
              "from tumorscope import cli\n"
              "@cli.app.command('onednn-probe')\n"
              "def probe():\n"
              f"    {probe}\n"
              "cli.app(['onednn-probe'])\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_cli_turns_onednn_on_before_tensorflow_loads_and_respects_a_users_choice():
    # Whatever this CPU's own default, the CLI's commands run with oneDNN on...
    assert _through_the_cli(None, ask_tensorflow=True) == "1 True"
    # ...unless the user said otherwise.
    assert _through_the_cli("0", ask_tensorflow=False) == "0"
