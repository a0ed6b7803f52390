"""The command line starts fast and speaks once: every ``--help`` answers without importing what
the commands run (torch, open_clip, segment_anything), each parser names a function that exists,
and every command logs in one format on stderr, the package's INFO (the backend an op falls back
to) shown with ``-v`` only and once per process."""

import ast
import json
import logging
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch

import fastsamclip.cli.bench as cli_bench
from fastsamclip import logs
from fastsamclip.cli import main
from fastsamclip.cli.parsers import DTYPE_CHOICES, build_parser
from fastsamclip.kernels import OPS, cosine_distill_loss
from fastsamclip.predictor.engine import DTYPES

CLI_DIR = os.path.dirname(os.path.abspath(cli_bench.__file__))
HEAVY = ("torch", "triton", "open_clip", "segment_anything", "torchvision", "numpy")
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ([\w.]+): (.*)")

# In a fresh interpreter: every command's --help through main(), then what got imported.
EVERY_HELP = r"""
import argparse, contextlib, io, json, sys
from fastsamclip.cli import build_parser, main

def leaves(parser, path):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for a in subs for name, p in a.choices.items() for leaf in leaves(p, path + [name])]

helps = {}
for path in [[]] + leaves(build_parser(), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(path + ["--help"])
        except SystemExit as e:
            assert e.code == 0, (path, e.code)
    helps[" ".join(path)] = out.getvalue()
print(json.dumps({"helps": helps, "heavy": sorted(m for m in %r if m in sys.modules)}))
"""

# In a fresh interpreter, as a command's run: a library's module-level logging.info (open_clip's
# way) before the package's warning; the warning must come out once, in the one format.
LIBRARY_FIRST = r"""
import logging
from fastsamclip import logs
logs.configure()
logging.info("Loaded built-in ViT-B-32 model config.")
logging.getLogger("fastsamclip.kernels").warning("the warning")
logging.getLogger("open_clip").warning("a library's warning")
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="100"))


def leaves(parser, path=()):
    """(command path, its parser) of every command that runs."""
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subs:
        return [(path, parser)]
    return [leaf for a in subs for name, p in a.choices.items() for leaf in leaves(p, path + (name,))]


# ------------------------------------------------------------------------------------ starting
def test_every_help_answers_without_importing_what_the_commands_run():
    r = run_python(EVERY_HELP % (HEAVY,))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["heavy"] == [], result["heavy"]
    helps = result["helps"]
    assert len(helps) == 1 + len(leaves(build_parser())) >= 16
    for path, text in helps.items():
        assert text.startswith(f"usage: fastsamclip {path}".rstrip()), (path, text[:200])
    assert "--stage2-lr STAGE2_LR" in helps["distill"] and "(default: 4e-05)" in helps["distill"]
    assert r.stderr == ""


def test_fastsamclip_help_takes_well_under_the_seconds_it_took():
    """It took 11-12 s (torch, open_clip and segment_anything imported before parsing); 8 s is a
    bound a loaded machine keeps, the import test above is the one that cannot flake."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fastsamclip", "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t
    assert r.returncode == 0 and r.stdout.startswith("usage: fastsamclip"), r.stderr[-2000:]
    assert seconds < 8, f"fastsamclip --help took {seconds:.1f} s"


def test_each_command_names_a_function_of_its_module():
    """The module named by each parser's ``run`` defines that function at its top (read, not
    imported): a typo would otherwise surface only when someone runs the command."""
    for path, parser in leaves(build_parser()):
        module, _, function = parser.get_default("run").partition(":")
        tree = ast.parse(open(os.path.join(CLI_DIR, f"{module}.py")).read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert function in defined, (path, module, function)


def test_choices_written_in_the_parser_are_their_homes():
    assert set(DTYPE_CHOICES) == {"auto", *DTYPES}


# ------------------------------------------------------------------------------------- logging
@pytest.fixture
def command(monkeypatch):
    """``fastsamclip bench`` runs ``body(args)`` instead (the dispatch, parsing and logging are
    the real ones); the attention op forgets the fallbacks it logged."""
    def install(body):
        monkeypatch.setattr(cli_bench, "cmd_bench", lambda args: body(args) or 0)
    for op in OPS.values():
        monkeypatch.setattr(op, "_logged", set())
    return install


def lines(err: str):
    out = err.splitlines()
    assert all(LINE.fullmatch(line) for line in out), out
    return [LINE.fullmatch(line).groups() for line in out]


def test_one_format_the_package_at_its_level_libraries_from_warning(command, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # as a library's basicConfig(level=DEBUG) would: libraries still from WARNING

    def body(args):
        for name in ("fastsamclip.kernels", "fastsamclip.train", "some.library"):
            log = logging.getLogger(name)
            log.debug("debug")
            log.info("info")
            log.warning("warning")

    command(body)
    root_handlers = list(logging.getLogger().handlers)
    package_level = logging.getLogger("fastsamclip").level
    seen = {}
    for argv in (["bench"], ["-v", "bench"], ["bench", "-v"], ["bench", "-vv"]):
        assert main(argv) == 0
        seen[" ".join(argv)] = lines(capsys.readouterr().err)
    warnings = [("WARNING", n, "warning") for n in ("fastsamclip.kernels", "fastsamclip.train", "some.library")]
    assert seen["bench"] == warnings
    verbose = [("INFO", "fastsamclip.kernels", "info"), warnings[0], ("INFO", "fastsamclip.train", "info"),
               warnings[1], warnings[2]]
    assert seen["-v bench"] == seen["bench -v"] == verbose
    assert seen["bench -vv"] == [("DEBUG", "fastsamclip.kernels", "debug"), *verbose[:2],
                                 ("DEBUG", "fastsamclip.train", "debug"), *verbose[2:]]
    # A command called in-process leaves the caller's logging as it found it.
    assert logging.getLogger().handlers == root_handlers and logging.getLogger("fastsamclip").level == package_level


def test_a_library_logging_first_does_not_change_the_format():
    """open_clip's module-level ``logging.info`` installs logging's default format when nothing is
    configured: the same warning then came out as ``WARNING:fastsamclip.kernels:...`` in some
    commands and bare in others."""
    r = run_python(LIBRARY_FIRST)
    assert r.returncode == 0, r.stderr
    assert lines(r.stderr) == [("WARNING", "fastsamclip.kernels", "the warning"),
                               ("WARNING", "open_clip", "a library's warning")]


def test_the_backend_fallback_is_said_with_v_only_and_once(command, capsys):
    """A real op's fallback (fp64 is no kernel dtype: the plain-torch reference) through the real
    command line: INFO, so nothing without -v; with -v one line however many calls."""
    s = torch.randn(3, 10, dtype=torch.float64)

    def body(args):
        for _ in range(3):
            cosine_distill_loss(s, s.flip(0))

    command(body)
    assert main(["bench"]) == 0
    assert capsys.readouterr().err == ""
    for op in OPS.values():
        op._logged.clear()
    assert main(["bench", "-v"]) == 0 and main(["bench", "-v"]) == 0  # one process: said once
    said = lines(capsys.readouterr().err)
    assert len(said) == 1, said
    level, name, message = said[0]
    assert (level, name) == ("INFO", "fastsamclip.kernels")
    assert message.startswith("cosine_distill_loss: using 'reference'") and "float64" in message


def test_the_server_worker_logs_as_the_command_that_started_it(monkeypatch):
    """The model worker is a spawned process: its setup configures the same logging, at the level
    the command had when it built the server (``serve -v``: the worker's INFO too)."""
    app = pytest.importorskip("fastsamclip.serve.app")
    if app.MISSING:
        pytest.skip(f"the serve extra is not installed ({app.MISSING})")
    configured = []
    monkeypatch.setattr(app, "logs", types.SimpleNamespace(PACKAGE=logs.PACKAGE, configure=configured.append))
    monkeypatch.setattr(app, "child_of_server", lambda: None)
    monkeypatch.setattr(app, "SAMCLIPPredictor", lambda *a, **k: configured.append("loading") or 1 / 0)
    spec = app.Endpoints(app.Limits(), app.Geometry(img_size=64, patch_size=16), {})
    for level in (logging.INFO, logging.WARNING):
        with logs.to_stderr(level):
            api = app.SAMCLIPAPI("merged.safetensors", spec)
        with pytest.raises(ZeroDivisionError):
            api.setup("cpu")
    assert configured == [logging.INFO, "loading", logging.WARNING, "loading"]
