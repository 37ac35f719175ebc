import subprocess
import sys

from sparsecomm.cli import main


def test_demo_runs_small(capsys):
    assert main(["demo", "--numel", "200000", "--density", "0.01", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "vs dense fp32" in out and "bits/entry" in out and "select=" in out and "codec auto" in out


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "sparsecomm.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_every_subcommand_has_help():
    from sparsecomm.cli import COMMANDS

    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "sparsecomm.cli", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: sparsecomm " + name in r.stdout, (name, r.stderr)
