"""focal_dice_loss: SAM's mask loss, fused, against float64 references, torchvision's focal
loss and autograd: 17 x 23 masks, a mask wider than one 4096-pixel block, 1-pixel masks, 129
masks, saturated logits, alpha/gamma variants; bitwise determinism.

On a machine without a GPU the Triton kernels run in the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes are small but awkward on purpose. bf16 numerics are GPU-only
(the interpreter's bf16 arithmetic is wrong). Uninitialised outputs are poisoned (the
``poison_empty`` fixture), so an element a kernel forgets to write fails the finite check.
"""

import pytest
import torch

from ..conftest import requires_cuda
from ..helpers import DEVICE, assert_close_verbose, check_grad, check_loss, grads_vs_reference, rand

NUMERIC_DTYPES = [torch.float32, torch.float16]  # bf16: GPU only, see test_bf16_on_gpu
pytestmark = pytest.mark.usefixtures("poison_empty")  # an unwritten output element is NaN

from fastsamclip.kernels import focal_dice_loss, focal_dice_loss_reference


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------
MASK_SHAPES = [(2, 3, 17, 23), (1, 1, 64, 80), (3, 1, 1, 1)]  # odd sizes; 5120 px = 2 blocks; 1 px


def mask_inputs(shape, dtype, logit_scale=3.0):
    logits = rand(*shape, dtype=dtype, scale=logit_scale)
    soft = torch.rand(*shape, dtype=torch.float64)
    hard = (torch.rand(*shape, dtype=torch.float64) > 0.7).double()
    # half soft teacher probabilities, half hard 0/1 masks: both kinds of target occur in training
    target = torch.where(torch.rand(*shape, dtype=torch.float64) > 0.5, soft, hard).to(dtype).to(DEVICE)
    return logits, target


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_focal_dice_matches_float64(dtype, shape):
    logits, target = mask_inputs(shape, dtype)
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], dtype, ["logits"])


@pytest.mark.parametrize("shape", [(3, 43, 2, 3), (1, 1, 257, 257)], ids=["129-masks", "17-blocks"])
def test_focal_dice_finalize_loops(shape):
    """The one-program reduction steps over masks 128 at a time and over blocks 16 at a time:
    129 masks, and a 257 x 257 mask (17 blocks of 4096 pixels), take both loops."""
    logits, target = mask_inputs(shape, torch.float32)
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], torch.float32, ["logits"])


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 2.0), (0.25, 0.0), (0.6, 1.0), (0.25, 1.5), (0.25, 3.0), (0.25, 0.5)])
def test_focal_dice_alpha_gamma(alpha, gamma):
    logits, target = mask_inputs((2, 2, 9, 13), torch.float32)
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], torch.float32, ["logits"],
                       focal_weight=3.0, dice_weight=0.7, alpha=alpha, gamma=gamma)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.4, 1.5)])
def test_focal_part_equals_torchvision(alpha, gamma):
    from torchvision.ops import sigmoid_focal_loss

    logits, target = mask_inputs((2, 3, 11, 7), torch.float32)
    logits.requires_grad_(True)
    out = focal_dice_loss(logits, target, focal_weight=1.0, dice_weight=0.0, alpha=alpha, gamma=gamma)
    x64 = logits.detach().double().requires_grad_(True)
    ref = sigmoid_focal_loss(x64, target.double(), alpha=alpha, gamma=gamma, reduction="mean")
    check_loss(out, ref, torch.float32, "focal vs torchvision")
    (g,) = torch.autograd.grad(out, logits, torch.tensor(0.37))
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(0.37, dtype=torch.float64))
    check_grad(g, g64, torch.float32, "focal grad vs torchvision")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dice_part_equals_the_formula_written_out(backend):
    """The dice term against SAM's formula written here in float64, per mask over its pixels:
    mean over masks of 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(logits)."""
    from fastsamclip.kernels import OPS

    if OPS["focal_dice_loss"][backend].is_available():
        pytest.skip(OPS["focal_dice_loss"][backend].is_available())
    logits, target = mask_inputs((2, 5, 9, 13), torch.float32)
    logits.requires_grad_(True)
    out = focal_dice_loss(logits, target, focal_weight=0.0, dice_weight=1.0, backend=backend)
    x64 = logits.detach().double().requires_grad_(True)
    p, t = torch.sigmoid(x64), target.double()
    ref = (1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)).mean()
    check_loss(out, ref, torch.float32, "dice vs the formula")
    (g,) = torch.autograd.grad(out, logits, torch.tensor(1.3))
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(1.3, dtype=torch.float64))
    check_grad(g, g64, torch.float32, "dice grad vs the formula")


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_focal_dice_extreme_logits(dtype):
    """Saturated logits (+-30, +-100, +-1000) with hard and soft targets: finite, and equal to
    the float64 reference (whose BCE-with-logits is stable there)."""
    values = torch.tensor([30.0, -30.0, 100.0, -100.0, 1000.0, -1000.0, 0.0])
    n = 2 * 2 * 9 * 9  # 7 logits x 3 targets cycle through every pairing (7 and 3 are coprime)
    logits = values.repeat(n // 7 + 1)[:n].reshape(2, 2, 9, 9).to(dtype).to(DEVICE)
    target = torch.tensor([0.0, 1.0, 0.3]).repeat(n // 3)[:n].reshape(2, 2, 9, 9).to(dtype).to(DEVICE)
    x = logits.clone().requires_grad_(True)
    out = focal_dice_loss(x, target)
    (g,) = torch.autograd.grad(out, x, torch.tensor(0.37, dtype=dtype, device=DEVICE))
    assert torch.isfinite(out) and torch.isfinite(g).all(), (out, g)
    x64 = logits.double().requires_grad_(True)
    ref = focal_dice_loss_reference(x64, target.double())
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(0.37, dtype=torch.float64, device=DEVICE))
    check_loss(out, ref, dtype, "extreme logits loss")
    check_grad(g, g64, dtype, "extreme logits grad")


def test_focal_dice_is_deterministic():
    """Per-block partial sums reduced in a fixed order: bitwise equal run to run (float atomics
    would not be, on a GPU)."""
    logits, target = mask_inputs((2, 2, 70, 90), torch.float32)
    x = logits.requires_grad_(True)
    runs = []
    for _ in range(2):
        out = focal_dice_loss(x, target)
        runs.append((out.detach(), torch.autograd.grad(out, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------
def test_input_errors():
    m = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, M, h, w\)"):
        focal_dice_loss(m[0], m[0])
    with pytest.raises(ValueError, match="logits' shape"):
        focal_dice_loss(m, m[..., :3])
    with pytest.raises(TypeError, match="floating-point"):
        focal_dice_loss(m, (m > 0))
    with pytest.raises(ValueError, match="one device"):
        focal_dice_loss(m, m.to("meta"))
    with pytest.raises(ValueError, match="gamma"):
        focal_dice_loss(m, m.sigmoid(), gamma=-1.0)


# --------------------------------------------------------------------------------------------
# torch.library registration: torch.compile and opcheck
# --------------------------------------------------------------------------------------------
def test_compile_fullgraph_fwd_bwd():
    """No graph breaks, same numbers."""
    torch._dynamo.reset()
    logits, target = mask_inputs((2, 2, 5, 7), torch.float32)
    runs = []
    for fn in (focal_dice_loss, torch.compile(focal_dice_loss, fullgraph=True)):
        x = logits.clone().requires_grad_(True)
        out = fn(x, target.clone())
        runs.append((out, torch.autograd.grad(out, [x])))
    assert_close_verbose(runs[1][0], runs[0][0], 1e-6, 1e-6, "compiled loss")
    for a, e in zip(runs[1][1], runs[0][1]):
        assert_close_verbose(a, e, 1e-6, 1e-6, "compiled grad")


def test_opcheck():
    ops = torch.ops.fastsamclip
    logits, target = mask_inputs((2, 2, 5, 7), torch.float32)
    torch.library.opcheck(ops.focal_dice_fwd.default, (logits.requires_grad_(True), target, 20.0, 1.0, 0.25, 2.0))
    torch.library.opcheck(ops.focal_dice_bwd.default,
                          (logits.detach(), target, rand(4, 2), torch.tensor(0.37), 20.0, 0.25, 2.0))


# --------------------------------------------------------------------------------------------
# bf16 (GPU only)
# --------------------------------------------------------------------------------------------
@requires_cuda
def test_bf16_on_gpu():
    dtype = torch.bfloat16
    logits, target = mask_inputs((2, 3, 67, 129), dtype)
    logits[0, 0, 0, :4] = torch.tensor([30.0, -30.0, 100.0, -100.0])
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], dtype, ["logits"])
