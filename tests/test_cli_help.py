"""Every option of every command-line tool has help text (`--help` explains each one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# In a subprocess: importing dip_scale.train.__main__ installs its signal handlers.
LIST_OPTIONS = """
import argparse, json
from data_prep.cli import build_parser as prep
from dip_scale.eval.cli import build_parser as evaluate
from dip_scale.export import build_parser as export
from dip_scale.sample import build_parser as sample
from dip_scale.train.__main__ import build_parser as train
from dip_scale.demo import build_parser as demo

def walk(name, parser, out):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                walk(f"{name} {sub}", subparser, out)
        elif not isinstance(action, argparse._HelpAction):
            out.append([name, "/".join(action.option_strings) or action.dest, action.help or ""])
    return out

tools = {"dip-prep": prep, "dip-eval": evaluate, "dip-export": export, "dip-sample": sample, "dip-train": train,
         "python -m dip_scale.demo": demo}
print(json.dumps([row for name, build in tools.items() for row in walk(name, build(), [])]))
"""


def test_every_option_of_every_tool_has_help_text():
    done = subprocess.run([sys.executable, "-c", LIST_OPTIONS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    options = json.loads(done.stdout)
    assert {name.split()[0] for name, _, _ in options} >= {"dip-prep", "dip-eval", "dip-export", "dip-sample",
                                                           "dip-train", "python"}
    assert len(options) > 60  # the walk reached the sub-commands
    missing = [f"{name} {option}" for name, option, text in options if len(text.strip()) < 10]
    assert not missing, f"options without help text: {missing}"
