"""One backend chooser for every op of ``fastsamclip.kernels``.

An :class:`Op` holds its backends in priority order; each :class:`Backend` declares what it
can take. Per call, ``op.select(*inputs)`` returns the first backend that can run the inputs:

* ``is_available() -> str | None``: why the backend cannot run at all on this install (a
  missing package, no GPU, a library that does not load); ``None`` when it can.
* ``check(*inputs) -> list[str]``: why it cannot take these inputs (device, dtype, shape).
* ``auto_check(*inputs) -> list[str]``: why it should not be *picked automatically* although it
  could run them (a Triton kernel on CPU runs in the slow interpreter). Forcing ignores it.
* ``notes(*inputs) -> list[str]``: how it runs inputs it takes, where that is a choice the user
  should see (fp32 on TF32 tensor cores or in exact fp32); ``fastsamclip info`` prints them.

A preferred backend that refuses is never a silent fallback: the first call that falls back
for a given (op, chosen backend, refusals) logs them once per process, at INFO, on the
``fastsamclip.kernels`` logger (``fastsamclip -v`` shows it: on a machine without a GPU every
command falls back, which is no news at WARNING), and nothing is logged while ``torch.compile``
traces. When no backend can run the inputs, the error lists every backend with its reasons.

Forcing a backend, strongest first:

* the ``backend=`` argument of each public function;
* ``with use_backend(name):`` (every op that has a backend of that name) or
  ``with use_backend(name, op="relpos_attention"):`` (that op only); ``use_backend(None)``
  restores the automatic choice inside the block;
* ``FASTSAMCLIP_BACKEND_<OP>=<name>``, e.g. ``FASTSAMCLIP_BACKEND_RELPOS_ATTENTION=sdpa``;
* ``FASTSAMCLIP_BACKEND=<name>``: every op that has a backend of that name.

The two environment variables are read once, when ``fastsamclip.kernels`` is imported (after
every op has registered its backends); a value no op knows raises there, naming the valid ones.
A forced backend that cannot take an input raises with its reasons. A backend the environment
names that cannot run on this machine at all (``is_available``: no GPU, no Triton) is a WARNING
there, naming the variable and the reason, and the op chooses automatically: the variable is
the person's request, often set for another machine, and the one backend-choice message at
WARNING is the one that says a request was not met.

Every op has a backend named ``"reference"``: plain torch, the arithmetic the others must equal.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch

__all__ = ["Backend", "Op", "OPS", "Probe", "dtype_grad_probes", "op_table", "register_op", "use_backend"]

log = logging.getLogger("fastsamclip.kernels")

ENV_ALL = "FASTSAMCLIP_BACKEND"
ENV_OP_PREFIX = "FASTSAMCLIP_BACKEND_"
# Variables of earlier versions: ignored now, with a warning that names the replacement.
_RETIRED_ENV = {"FASTSAMCLIP_ATTENTION_BACKEND": "FASTSAMCLIP_BACKEND_RELPOS_ATTENTION",
                "FASTSAMCLIP_LOSSES_BACKEND": "FASTSAMCLIP_BACKEND_<LOSS> (e.g. FASTSAMCLIP_BACKEND_FOCAL_DICE_LOSS)"}


def _no_reasons(*args, **kwargs) -> List[str]:
    return []


def _always_available() -> Optional[str]:
    return None


@dataclass
class Backend:
    """One way to compute an op.

    ``fn`` computes it (its arguments are the op's, see each op's public function);
    ``check(*inputs, **kw)`` returns the reasons it cannot take these inputs (empty: it can);
    ``is_available()`` says why it cannot run at all here (``None``: it can);
    ``auto_check(*inputs, **kw)`` returns the reasons not to pick it automatically although able;
    ``notes(*inputs, **kw)`` says how it runs inputs it takes (e.g. at which precision).
    """

    name: str
    fn: Callable
    description: str
    check: Callable[..., List[str]] = field(default=_no_reasons)
    is_available: Callable[[], Optional[str]] = field(default=_always_available)
    auto_check: Callable[..., List[str]] = field(default=_no_reasons)
    notes: Callable[..., List[str]] = field(default=_no_reasons)

    def refusals(self, *args, **kwargs) -> List[str]:
        """Why this backend cannot run these inputs (availability first); empty: it can."""
        why = self.is_available()
        if why is not None:
            return [why]
        return list(self.check(*args, **kwargs))


class Probe(NamedTuple):
    """A small input of an op for :func:`op_table`: ``op.select(*args, **kwargs)``."""

    label: str  # e.g. "float16 fwd+bwd", shown beside the backends' answers
    args: tuple
    kwargs: dict


def dtype_grad_probes(device: str, make: Callable[[torch.dtype, bool], tuple], detail: str = "") -> List[Probe]:
    """Probes per dtype (bf16, fp16, fp32 on a GPU; fp32 on the CPU), forward and forward +
    backward: ``make(dtype, needs_grad) -> (args, kwargs)``; ``detail`` joins the label."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if str(device).startswith("cuda") else (torch.float32,)
    probes = []
    for dtype in dtypes:
        for grad in (False, True):
            label = " ".join(filter(None, (str(dtype).replace("torch.", ""), detail, "fwd+bwd" if grad else "fwd")))
            probes.append(Probe(label, *make(dtype, grad)))
    return probes


class Op:
    """An op and its backends in priority order (the first able one is chosen).

    ``probes(device, **options) -> list[Probe]`` gives the small inputs :meth:`table` asks each
    backend about (for ``fastsamclip info``).
    """

    def __init__(self, name: str, probes: Optional[Callable[..., List[Probe]]] = None):
        self.name = name
        self.probes = probes or (lambda device, **options: [])
        self._backends: Dict[str, Backend] = {}
        self._order: List[Backend] = []
        # Forced backend names: [environment's] + one per active use_backend block; None = automatic.
        self._forced: List[Optional[str]] = [None]
        self._logged: set = set()

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={self.names})"

    # ----------------------------------------------------------------------------- registry
    def register(self, backend: Backend, priority: Optional[int] = None) -> Backend:
        """Add (or replace) a backend; ``priority`` is its index in the order (default: last)."""
        if backend.name in self._backends:
            self.unregister(backend.name)
        self._backends[backend.name] = backend
        self._order.insert(len(self._order) if priority is None else priority, backend)
        return backend

    def unregister(self, name: str) -> None:
        be = self._backends.pop(name)
        self._order.remove(be)

    @property
    def names(self) -> List[str]:
        """Backend names in priority order."""
        return [be.name for be in self._order]

    @property
    def backends(self) -> List[Backend]:
        """Backends in priority order."""
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._backends

    def __getitem__(self, name: str) -> Backend:
        be = self._backends.get(name)
        if be is None:
            raise ValueError(self._unknown(name))
        return be

    def _unknown(self, name: str) -> str:
        return f"unknown backend {name!r} for {self.name}; known: {', '.join(self.names)}"

    @property
    def forced(self) -> Optional[str]:
        """The backend forced by the innermost ``use_backend`` block or the environment."""
        return self._forced[-1]

    # ---------------------------------------------------------------------------- selection
    def select(self, *args, backend: Optional[str] = None, **kwargs) -> Backend:
        """The backend that will run these inputs (``args``/``kwargs`` go to ``check``).

        ``backend`` forces one by name (else the innermost ``use_backend``, else the
        environment); a forced backend that cannot take the inputs raises with its reasons.
        Otherwise the first able backend in priority order; none able raises with every
        backend's reasons.
        """
        name = backend if backend is not None else self._forced[-1]
        if name is not None:
            be = self._backends.get(name)
            if be is None:
                raise ValueError(self._unknown(name))
            why = be.refusals(*args, **kwargs)
            if why:
                raise RuntimeError(f"{self.name}: backend {name!r} was forced but cannot run this input: "
                                   + "; ".join(why))
            return be
        refused = []
        for be in self._order:  # the hot path (every eager call): no work past the first able one
            unavailable = be.is_available()
            why = [unavailable] if unavailable is not None else (be.check(*args, **kwargs)
                                                                  or be.auto_check(*args, **kwargs))
            if not why:
                if refused:
                    self._log_fallback(be, refused)
                return be
            refused.append((be.name, why))
        raise RuntimeError(f"{self.name}: no backend can run this input:\n"
                           + "\n".join(f"  {n}: {'; '.join(w)}" for n, w in refused))

    def _log_fallback(self, chosen: Backend, refused) -> None:
        if torch.compiler.is_compiling():
            return
        key = (chosen.name, tuple((n, tuple(w)) for n, w in refused))
        if key in self._logged:
            return
        self._logged.add(key)
        log.info("%s: using %r (%s); preferred backends refused: %s", self.name, chosen.name,
                    chosen.description, " | ".join(f"{n}: {'; '.join(w)}" for n, w in refused))

    # ------------------------------------------------------------------------------- report
    def table(self, device: Optional[str] = None, **options) -> List[dict]:
        """Each backend's answer for each probe input: rows of (op, backend, probe, ok,
        forced_ok, why, description, notes). ``ok``: picked automatically when first;
        ``forced_ok``: runs when forced; ``notes``: how it runs the probe when it can. ``options``
        go to the op's probes (e.g. ``head_dim`` for attention)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = []
        for probe in self.probes(device, **options):
            for be in self._order:
                why = be.refusals(*probe.args, **probe.kwargs)
                not_auto = [] if why else list(be.auto_check(*probe.args, **probe.kwargs))
                notes = [] if why else list(be.notes(*probe.args, **probe.kwargs))
                rows.append(dict(op=self.name, backend=be.name, probe=probe.label,
                                 ok=not why and not not_auto, forced_ok=not why,
                                 why="; ".join(why or [f"not chosen automatically: {w}" for w in not_auto]),
                                 description=be.description, notes="; ".join(notes)))
        return rows


OPS: Dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Make ``op`` known to :func:`use_backend`, :func:`op_table` and the environment."""
    if op.name in OPS:
        raise ValueError(f"an op named {op.name!r} is already registered")
    OPS[op.name] = op
    return op


def _known_names() -> List[str]:
    return sorted({n for op in OPS.values() for n in op.names})


@contextlib.contextmanager
def use_backend(name: Optional[str], op: Optional[str] = None) -> Iterator[None]:
    """Force backend ``name`` inside the block: for ``op`` only, or (``op=None``) for every op
    that has a backend of that name (the others keep their choice). ``None`` restores the
    automatic choice. An unknown name raises, listing the known ones."""
    if op is not None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        targets = [OPS[op]]
        if name is not None and name not in OPS[op]:
            raise ValueError(OPS[op]._unknown(name))
    else:
        targets = [o for o in OPS.values() if name is None or name in o]
        if not targets:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(_known_names())}")
    for o in targets:
        o._forced.append(name)
    try:
        yield
    finally:
        for o in targets:
            o._forced.pop()


def op_table(device: Optional[str] = None) -> List[dict]:
    """For ``fastsamclip info``: every op, every backend, on small probe inputs of ``device``
    (default: cuda if available, else cpu). Rows: op, backend, probe, ok (chosen automatically
    when first able), forced_ok (runs when forced), why (reasons, empty when ok), description,
    notes (how it runs the probe, e.g. fp32 on TF32).
    For other probe options of one op: ``OPS[name].table(device, **options)``."""
    return [row for op in OPS.values() for row in op.table(device)]


def _env_var(op: Op) -> str:
    return ENV_OP_PREFIX + op.name.upper()


def _apply_environment(environ: Mapping[str, str]) -> None:
    """Set every op's base forcing from ``FASTSAMCLIP_BACKEND`` and ``FASTSAMCLIP_BACKEND_<OP>``;
    raises for a value (or an op) nobody knows. Called once by ``fastsamclip.kernels``."""
    for old, new in _RETIRED_ENV.items():
        if environ.get(old):
            log.warning("%s=%s is ignored: the backends are chosen by %s and %s now", old, environ[old],
                        ENV_ALL, new)
    by_var = {_env_var(op): op for op in OPS.values()}
    for var, value in environ.items():
        if var.startswith(ENV_OP_PREFIX) and value and var not in by_var:
            raise ValueError(f"{var}={value!r}: no op of that name; per-op variables: {', '.join(sorted(by_var))}")
    everywhere = environ.get(ENV_ALL) or None
    if everywhere is not None and everywhere not in _known_names():
        raise ValueError(f"{ENV_ALL}={everywhere!r}: no op has a backend of that name; known: "
                         f"{', '.join(_known_names())}")
    unable: Dict[Tuple[str, str, str], List[str]] = {}  # (variable, backend, why) -> ops
    for var, op in by_var.items():
        name, source = environ.get(var) or None, var
        if name is not None and name not in op:
            raise ValueError(f"{var}={name!r}: {op._unknown(name)}")
        if name is None and everywhere in op:
            name, source = everywhere, ENV_ALL
        why = op[name].is_available() if name is not None else None
        if why is not None:  # asked for, but it cannot run here at all: said below, not forced
            unable.setdefault((source, name, why), []).append(op.name)
            name = None
        op._forced[0] = name
    for (var, name, why), ops in unable.items():
        log.warning("%s=%s: backend %r cannot run here (%s); %s automatically", var, name, name, why,
                    f"{ops[0]} chooses its backend" if len(ops) == 1 else f"{', '.join(ops)} choose their backends")

