"""The one backend chooser of every op (kernels/dispatch.py): the first able backend, forcing by
argument, by ``use_backend`` and by both environment variables, one log line per distinct
fallback, errors that list every backend, the ``op_table`` of ``fastsamclip info``; and the
layer rule that the kernels import torch, triton, numpy and the standard library only."""

import ast
import importlib
import logging
import os
import sys

import pytest
import torch

import fastsamclip
from fastsamclip.kernels import OPS, Backend, Op, _triton, dispatch, op_table, use_backend

KERNELS_DIR = os.path.dirname(os.path.abspath(dispatch.__file__))


def toy_op(name="toy"):
    """fast (refuses float64), slow (able, but never automatic on CPU), reference (always)."""
    op = Op(name)
    op.register(Backend("fast", fn=lambda x: ("fast", x), description="the fast one",
                        check=lambda x: [f"dtype {x.dtype}"] if x.dtype == torch.float64 else []))
    op.register(Backend("slow", fn=lambda x: ("slow", x), description="able, not automatic on cpu",
                        auto_check=lambda x: ["cpu: would be slow"] if x.device.type == "cpu" else []))
    op.register(Backend("reference", fn=lambda x: ("reference", x), description="plain torch"))
    return op


@pytest.fixture
def toy(monkeypatch):
    """A toy op registered beside the real ones for the duration of a test."""
    op = toy_op()
    monkeypatch.setitem(OPS, op.name, op)
    return op


F32, F64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------
def test_first_able_backend_wins_and_auto_check_only_affects_the_automatic_choice(toy):
    assert toy.names == ["fast", "slow", "reference"]
    assert toy.select(F32).name == "fast"
    assert toy.select(F64).name == "reference"  # fast refuses fp64, slow is not automatic on cpu
    assert toy.select(F64, backend="slow").name == "slow"  # forcing ignores auto_check
    toy.register(Backend("first", fn=None, description="d"), priority=0)
    assert toy.names[0] == "first" and toy.select(F32).name == "first"
    toy.register(Backend("first", fn=None, description="d"))  # re-registering moves it
    assert toy.names == ["fast", "slow", "reference", "first"]


def test_forced_backend_that_cannot_take_the_input_raises_with_its_reasons(toy):
    with pytest.raises(RuntimeError, match="toy: backend 'fast' was forced but cannot run this input: dtype"):
        toy.select(F64, backend="fast")
    toy.register(Backend("absent", fn=None, description="d", is_available=lambda: "not installed here"))
    with pytest.raises(RuntimeError, match="'absent' was forced.*not installed here"):
        toy.select(F32, backend="absent")
    with pytest.raises(ValueError, match="unknown backend 'nope' for toy; known: fast, slow, reference, absent"):
        toy.select(F32, backend="nope")


def test_no_able_backend_lists_every_backend_with_its_reasons(toy):
    toy.register(Backend("reference", fn=None, description="d", check=lambda x: ["refuses for the test"]))
    with pytest.raises(RuntimeError) as err:
        toy.select(F64)
    assert str(err.value) == ("toy: no backend can run this input:\n  fast: dtype torch.float64\n"
                              "  slow: cpu: would be slow\n  reference: refuses for the test")


def test_fallback_logged_once_per_distinct_reasons(toy, caplog):
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        for _ in range(3):
            toy.select(F64)
        toy.select(F32)  # no fallback: nothing to say
        toy.select(F64.half().double())  # same refusals: said already
    assert len(caplog.records) == 1, caplog.text
    assert caplog.records[0].levelno == logging.INFO  # no news on a machine without a GPU: shown with -v
    msg = caplog.records[0].getMessage()
    assert msg.startswith("toy: using 'reference' (plain torch); preferred backends refused: ")
    assert "fast: dtype torch.float64 | slow: cpu: would be slow" in msg
    toy.register(Backend("fast", fn=None, description="d", check=lambda x: ["another reason"]), priority=0)
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        toy.select(F64)
        toy.select(F64)
    assert len(caplog.records) == 2 and "another reason" in caplog.records[1].getMessage()


def test_nothing_is_logged_while_compiling(toy, caplog, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        assert toy.select(F64).name == "reference"
    assert not caplog.records
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        toy.select(F64)
    assert len(caplog.records) == 1  # not remembered as said while compiling


# ---------------------------------------------------------------------------------------------
# Forcing: argument > use_backend > FASTSAMCLIP_BACKEND_<OP> > FASTSAMCLIP_BACKEND
# ---------------------------------------------------------------------------------------------
def test_use_backend_every_op_that_has_the_name(toy):
    attention = OPS["relpos_attention"]
    with use_backend("slow"):  # only the toy has "slow": the real ops keep their choice
        assert toy.select(F32).name == "slow"
        assert attention.forced is None
        with use_backend("reference"):  # innermost wins; every op has a reference
            assert toy.select(F32).name == "reference"
            assert all(op.forced == "reference" for op in OPS.values())
            with use_backend(None):  # automatic again inside
                assert toy.select(F32).name == "fast"
            assert toy.select(F32, backend="fast").name == "fast"  # the argument beats the block
        assert toy.select(F32).name == "slow"
    assert toy.select(F32).name == "fast" and all(op.forced is None for op in OPS.values())


def test_use_backend_one_op_and_errors(toy):
    with use_backend("reference", op="toy"):
        assert toy.select(F32).name == "reference"
        assert OPS["relpos_attention"].forced is None
    with pytest.raises(ValueError, match="unknown backend 'nope'; known: cuda, fast, flex, reference, sdpa, slow, triton"):
        with use_backend("nope"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'cuda' for toy"):
        with use_backend("cuda", op="toy"):
            pass
    with pytest.raises(ValueError, match="unknown op 'nope'; ops: relpos_attention, "):
        with use_backend("reference", op="nope"):
            pass
    with pytest.raises(KeyError):  # the block is left even when its body raises
        with use_backend("slow"):
            raise KeyError
    assert toy.forced is None


def test_environment_forces_every_op_or_one(toy, backend_environment):
    backend_environment({"FASTSAMCLIP_BACKEND": "slow"})  # only the toy has it
    assert toy.select(F32).name == "slow" and OPS["relpos_attention"].forced is None
    backend_environment({"FASTSAMCLIP_BACKEND": "reference", "FASTSAMCLIP_BACKEND_TOY": "fast",
                         "FASTSAMCLIP_BACKEND_RELPOS_ATTENTION": "sdpa"})
    assert toy.select(F32).name == "fast"  # the op's own variable beats the general one
    assert OPS["relpos_attention"].forced == "sdpa" and OPS["focal_dice_loss"].forced == "reference"
    with use_backend("slow"):  # a block beats the environment
        assert toy.select(F32).name == "slow"
    assert toy.select(F32, backend="reference").name == "reference"  # the argument beats it too
    with pytest.raises(RuntimeError, match="'fast' was forced"):  # forced by the environment: no fallback
        toy.select(F64)
    backend_environment({"FASTSAMCLIP_BACKEND": ""})  # empty: unset
    assert all(op.forced is None for op in OPS.values())


@pytest.mark.parametrize("environ, match", [
    ({"FASTSAMCLIP_BACKEND": "nope"}, "FASTSAMCLIP_BACKEND='nope': no op has a backend of that name; known: cuda, "),
    ({"FASTSAMCLIP_BACKEND_TOY": "sdpa"}, "FASTSAMCLIP_BACKEND_TOY='sdpa': unknown backend 'sdpa' for toy; known: fast"),
    ({"FASTSAMCLIP_BACKEND_NOPE": "reference"}, "FASTSAMCLIP_BACKEND_NOPE='reference': no op of that name; per-op "
                                                "variables: FASTSAMCLIP_BACKEND_COSINE_DISTILL_LOSS, "),
])
def test_environment_bad_values_raise_with_the_valid_ones(toy, backend_environment, environ, match):
    with pytest.raises(ValueError, match=match):
        backend_environment(environ)


def test_environment_naming_a_backend_that_cannot_run_here_warns_once_and_chooses_automatically(
        toy, backend_environment, caplog):
    """The variable is the person's request (often set for another machine): unmet, it is the one
    backend message at WARNING, one line per variable and reason naming the ops; the ops choose
    as if unset. A backend that can run but refuses an input still raises (above)."""
    toy.register(Backend("absent", fn=None, description="d", is_available=lambda: "no CUDA GPU"), priority=0)
    other = toy_op("toy2")
    other.register(Backend("absent", fn=None, description="d", is_available=lambda: "no CUDA GPU"), priority=0)
    OPS[other.name] = other
    try:
        with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
            backend_environment({"FASTSAMCLIP_BACKEND": "absent"})
        assert [r.levelno for r in caplog.records] == [logging.WARNING], caplog.text
        assert caplog.records[0].getMessage() == ("FASTSAMCLIP_BACKEND=absent: backend 'absent' cannot run here (no "
                                                  "CUDA GPU); toy, toy2 choose their backends automatically")
        assert toy.forced is None and toy.select(F32).name == "fast" and other.forced is None
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
            backend_environment({"FASTSAMCLIP_BACKEND_TOY": "absent", "FASTSAMCLIP_BACKEND_TOY2": "slow"})
        assert [r.getMessage() for r in caplog.records] == [
            "FASTSAMCLIP_BACKEND_TOY=absent: backend 'absent' cannot run here (no CUDA GPU); toy chooses its "
            "backend automatically"]
        assert toy.forced is None and other.forced == "slow"
    finally:
        del OPS[other.name]


def test_no_message_offers_a_test_only_switch(monkeypatch):
    """The Triton interpreter is the tests' way to run kernels on a CPU, never the person's: no
    string of the package but the variable's own name mentions it (docstrings aside), and the
    reasons shown on a machine without a GPU say so plainly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _triton.unavailable(interpret=False, import_error=None) == "no CUDA GPU"
    assert _triton.device_refusals(torch.device("cpu"), interpret=False) == ["device cpu (Triton kernels run on CUDA "
                                                                             "GPUs)"]
    package = os.path.dirname(os.path.abspath(fastsamclip.__file__))
    offers = []
    for folder in (KERNELS_DIR, package):
        for d, _, files in os.walk(folder):
            for f in (f for f in files if f.endswith(".py")):
                path = os.path.join(d, f)
                tree = ast.parse(open(path).read())
                docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
                    n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)}
                offers += [f"{path}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
                           and isinstance(n.value, str) and "TRITON_INTERPRET" in n.value
                           and n.value != "TRITON_INTERPRET" and id(n) not in docs]
    assert not offers, offers


def test_retired_variables_are_not_silently_ignored(toy, backend_environment, caplog):
    with caplog.at_level(logging.WARNING, logger="fastsamclip.kernels"):
        backend_environment({"FASTSAMCLIP_ATTENTION_BACKEND": "sdpa"})
    assert "FASTSAMCLIP_ATTENTION_BACKEND=sdpa is ignored" in caplog.text
    assert "FASTSAMCLIP_BACKEND_RELPOS_ATTENTION" in caplog.text


def test_environment_is_read_at_import(monkeypatch):
    """Re-running the package's import: a valid value forces the ops, a bad one fails the import."""
    import fastsamclip.kernels as kernels

    before = {name: op.forced for name, op in OPS.items()}
    monkeypatch.setenv("FASTSAMCLIP_BACKEND", "reference")
    monkeypatch.setenv("FASTSAMCLIP_BACKEND_RELPOS_ATTENTION", "sdpa")
    try:
        importlib.reload(kernels)
        assert OPS["relpos_attention"].forced == "sdpa"
        assert OPS["preprocess"].forced == "reference" and OPS["cosine_distill_loss"].forced == "reference"
        monkeypatch.setenv("FASTSAMCLIP_BACKEND_RELPOS_ATTENTION", "bogus")
        with pytest.raises(ValueError, match=r"FASTSAMCLIP_BACKEND_RELPOS_ATTENTION='bogus': unknown backend 'bogus' "
                                             r"for relpos_attention; known: triton, flex, sdpa, reference"):
            importlib.reload(kernels)
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)
    assert {name: op.forced for name, op in OPS.items()} == before


# ---------------------------------------------------------------------------------------------
# The ops, and what `fastsamclip info` prints
# ---------------------------------------------------------------------------------------------
def test_every_op_is_registered_with_a_reference_backend():
    assert list(OPS) == ["relpos_attention", "cosine_distill_loss", "linear_cosine_distill_loss",
                         "focal_dice_loss", "preprocess", "postprocess_masks"]
    for op in OPS.values():
        assert "reference" in op and op["reference"].is_available() is None, op
    assert OPS["preprocess"].names == ["cuda", "reference"] == OPS["postprocess_masks"].names
    for name in ("cosine_distill_loss", "linear_cosine_distill_loss", "focal_dice_loss"):
        assert OPS[name].names == ["triton", "reference"]


def test_op_table_rows():
    rows = op_table("cpu")
    assert set(rows[0]) == {"op", "backend", "probe", "ok", "forced_ok", "why", "description", "notes"}
    for op in OPS.values():
        mine = [r for r in rows if r["op"] == op.name]
        assert {r["backend"] for r in mine} == set(op.names)
        for probe in {r["probe"] for r in mine}:
            assert [r["backend"] for r in mine if r["probe"] == probe] == op.names  # priority order
    assert all(r["ok"] or r["why"] for r in rows) and all(r["forced_ok"] or not r["ok"] for r in rows)
    probes = {r["probe"] for r in rows if r["op"] == "focal_dice_loss"}
    assert probes == {"float32 fwd", "float32 fwd+bwd"}
    ref = [r for r in rows if r["backend"] == "reference"]
    assert ref and all(r["ok"] and r["forced_ok"] and not r["why"] for r in ref)
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert cuda and all(not r["ok"] and r["why"] for r in cuda)  # cpu probes: no CUDA kernel for them
    if OPS["relpos_attention"]["triton"].is_available() is None:
        (tri,) = [r for r in rows if r["backend"] == "triton" and r["probe"] == "float32 head_dim=64 fwd"]
        assert tri["forced_ok"] and not tri["ok"] and tri["why"].startswith("not chosen automatically: ")


def test_kernels_import_torch_triton_numpy_and_the_standard_library_only():
    allowed = {"torch", "triton", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for fname in sorted(os.listdir(KERNELS_DIR)):
        if not fname.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(KERNELS_DIR, fname)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"kernels/{fname}:{node.lineno} imports {name}"
