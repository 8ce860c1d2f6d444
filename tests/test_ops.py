"""The functional ops: the "torch" backend against the "naive" masked-weight backend and against an independent
per-sample loop written here, for outputs and gradients (x, alpha_weight, alpha_bias, a trainable weight), over
seeded random shapes; float64 gradcheck; and the ops' input validation.

Shapes are drawn once, at import, from a seeded generator, so a failing case id is reproducible.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from wfnet import ops

# PyTorch warns that padding="same" with an even kernel pads a copy of the input: expected for these cases.
pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same'"), pytest.mark.usefixtures("one_thread")]



BACKENDS = ("torch", "naive")


# ---------------------------------------------------------------------------------------------------------------------
# Independent reference: the paper's formula, one sample at a time, with PyTorch's own padding handling.

def ref_conv2d(x, weight, bias, aw, ab, rows, stride, padding, dilation, groups):
    outs = []
    for n in range(x.shape[0]):
        r = int(rows[n])
        w = weight * torch.sigmoid(aw[r]).to(weight.dtype).view(-1, 1, 1, 1)
        b = None
        if bias is not None:
            b = bias * (torch.sigmoid(ab[r]).to(bias.dtype) if ab is not None else 1)
        outs.append(F.conv2d(x[n:n + 1], w, b, stride, padding, dilation, groups))
    return torch.cat(outs)


def ref_linear(x, weight, bias, aw, ab, rows):
    outs = []
    for n in range(x.shape[0]):
        r = int(rows[n])
        w = weight * torch.sigmoid(aw[r]).to(weight.dtype).view(-1, 1)
        b = None if bias is None else bias * torch.sigmoid(ab[r]).to(bias.dtype)
        outs.append(F.linear(x[n:n + 1], w, b))
    return torch.cat(outs)


def _rows_for(rng, kind, batch, num_classes, gen):
    """rows as given to the op (int / tensor) and as a tensor for the reference."""
    if kind == "int":
        r = rng.randrange(num_classes)
        return r, torch.full((batch,), r, dtype=torch.long)
    if kind == "same":
        t = torch.full((batch,), rng.randrange(num_classes), dtype=torch.long)
        return t, t
    t = torch.randint(0, num_classes, (batch,), generator=gen)
    return t, t


# ---------------------------------------------------------------------------------------------------------------------
# Random conv cases

def _conv_cases(n_cases=28, seed=1234):
    rng = random.Random(seed)
    cases = []
    for i in range(n_cases):
        kind = rng.choice(["plain", "plain", "grouped", "depthwise"])
        if kind == "plain":
            groups, c_in, c_out = 1, rng.choice([1, 3, 5, 7, 8]), rng.choice([1, 3, 6, 9, 13])
        elif kind == "grouped":
            groups = rng.choice([2, 3])
            c_in, c_out = groups * rng.choice([1, 2, 3]), groups * rng.choice([1, 3])
        else:
            groups = c_in = rng.choice([3, 5, 8])
            c_out = c_in * rng.choice([1, 2])
        k = (rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 5]))
        stride = rng.choice([1, 1, 2, (1, 2), (2, 1)])
        dilation = rng.choice([1, 1, 2, (1, 2)])
        pads = [0, 1, (1, 2), "valid"]
        if stride == 1:
            pads += ["same", "same"]
        padding = rng.choice(pads)
        cases.append(dict(
            id=f"c{i}-{kind}-cin{c_in}-cout{c_out}-k{k[0]}x{k[1]}-s{stride}-d{dilation}-p{padding}",
            batch=rng.choice([1, 1, 2, 3, 5]), c_in=c_in, c_out=c_out, groups=groups, k=k, stride=stride,
            dilation=dilation, padding=padding, hw=(rng.randint(9, 12), rng.randint(9, 13)),
            num_classes=rng.choice([1, 2, 7, 10, 1000]), rows=rng.choice(["random", "random", "int", "same"]),
            bias=rng.random() < 0.8, train_weight=rng.random() < 0.5, seed=rng.randrange(2 ** 31),
        ))
    return cases


CONV_CASES = _conv_cases()


def _conv_inputs(case, dtype=torch.float32):
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    c_in, c_out, g = case["c_in"], case["c_out"], case["groups"]
    x = torch.randn(case["batch"], c_in, *case["hw"], generator=gen, dtype=dtype)
    weight = torch.randn(c_out, c_in // g, *case["k"], generator=gen, dtype=dtype) * 0.3
    bias = torch.randn(c_out, generator=gen, dtype=dtype) if case["bias"] else None
    # gates spread around 0 so that every row, and every channel, differs
    aw = torch.randn(case["num_classes"], c_out, generator=gen, dtype=dtype) * 2
    ab = torch.randn(case["num_classes"], c_out, generator=gen, dtype=dtype) * 2 if case["bias"] else None
    rows, rows_t = _rows_for(rng, case["rows"], case["batch"], case["num_classes"], gen)
    return x, weight, bias, aw, ab, rows, rows_t


def _leaves(*tensors, train_weight):
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        t = t.clone()
        # tensors order: x, weight, bias, aw, ab; the weight trains only when asked, the bias stays frozen
        if i in (0, 3, 4) or (i == 1 and train_weight):
            t.requires_grad_(True)
        out.append(t)
    return out


def _grads(out, grad_out, leaves):
    tensors = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, tensors, grad_out)
    return grads


@pytest.mark.parametrize("case", CONV_CASES, ids=[c["id"] for c in CONV_CASES])
def test_conv2d_backends_match_reference(case):
    x, weight, bias, aw, ab, rows, rows_t = _conv_inputs(case)
    conv_args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    ref_leaves = _leaves(x, weight, bias, aw, ab, train_weight=case["train_weight"])
    ref = ref_conv2d(*ref_leaves, rows_t, *conv_args)
    grad_out = torch.randn_like(ref)
    ref_grads = _grads(ref, grad_out, ref_leaves)
    # the op must also give the plain conv's output shape
    assert ref.shape == F.conv2d(x, weight, bias, *conv_args).shape
    for backend in BACKENDS:
        leaves = _leaves(x, weight, bias, aw, ab, train_weight=case["train_weight"])
        out = ops.wf_conv2d(*leaves, rows, *conv_args, backend=backend)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} output: {m}")
        grads = _grads(out, grad_out, leaves)
        assert len(grads) == len(ref_grads)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} grad: {m}")


def test_conv2d_rows_differ_per_sample():
    """Guards the reference tests against gates that happen to be equal: different rows give different outputs."""
    x = torch.randn(1, 3, 6, 6).expand(2, -1, -1, -1)
    w, aw = torch.randn(4, 3, 3, 3), torch.randn(5, 4)
    out = ops.wf_conv2d(x, w, None, aw, None, torch.tensor([1, 3]))
    assert not torch.allclose(out[0], out[1])
    out_same = ops.wf_conv2d(x, w, None, aw, None, 2)
    torch.testing.assert_close(out_same[0], out_same[1])


# ---------------------------------------------------------------------------------------------------------------------
# Random linear cases: [B, F], [B, T, F], [B, T1, T2, F]

def _linear_cases(n_cases=24, seed=99):
    rng = random.Random(seed)
    cases = []
    for i in range(n_cases):
        tokens = rng.choice([(), (), (1,), (7,), (17,), (3, 5), (2, 1)])
        f_in, f_out = rng.choice([1, 3, 8, 13, 32]), rng.choice([1, 5, 9, 24, 33])
        cases.append(dict(
            id=f"l{i}-tok{'x'.join(map(str, tokens)) or 'none'}-fin{f_in}-fout{f_out}",
            batch=rng.choice([1, 1, 2, 4, 6]), tokens=tokens, f_in=f_in, f_out=f_out,
            num_classes=rng.choice([1, 3, 10, 1000]), rows=rng.choice(["random", "random", "int", "same"]),
            bias=rng.random() < 0.8, train_weight=rng.random() < 0.5, seed=rng.randrange(2 ** 31),
        ))
    return cases


LINEAR_CASES = _linear_cases()


def _linear_inputs(case, dtype=torch.float32):
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    x = torch.randn(case["batch"], *case["tokens"], case["f_in"], generator=gen, dtype=dtype)
    weight = torch.randn(case["f_out"], case["f_in"], generator=gen, dtype=dtype) * 0.3
    bias = torch.randn(case["f_out"], generator=gen, dtype=dtype) if case["bias"] else None
    aw = torch.randn(case["num_classes"], case["f_out"], generator=gen, dtype=dtype) * 2
    ab = torch.randn(case["num_classes"], case["f_out"], generator=gen, dtype=dtype) * 2 if case["bias"] else None
    rows, rows_t = _rows_for(rng, case["rows"], case["batch"], case["num_classes"], gen)
    return x, weight, bias, aw, ab, rows, rows_t


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c["id"] for c in LINEAR_CASES])
def test_linear_backends_match_reference(case):
    x, weight, bias, aw, ab, rows, rows_t = _linear_inputs(case)
    ref_leaves = _leaves(x, weight, bias, aw, ab, train_weight=case["train_weight"])
    ref = ref_linear(*ref_leaves, rows_t)
    assert ref.shape == x.shape[:-1] + (case["f_out"],)
    grad_out = torch.randn_like(ref)
    ref_grads = _grads(ref, grad_out, ref_leaves)
    for backend in BACKENDS:
        leaves = _leaves(x, weight, bias, aw, ab, train_weight=case["train_weight"])
        out = ops.wf_linear(*leaves, rows, backend=backend)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} output: {m}")
        for g, rg in zip(_grads(out, grad_out, leaves), ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} grad: {m}")


def test_linear_every_token_uses_its_samples_row():
    x = torch.randn(1, 4, 6).expand(3, -1, -1)
    w, aw = torch.randn(5, 6), torch.randn(4, 5) * 3
    out = ops.wf_linear(x, w, None, aw, None, torch.tensor([0, 3, 0]))
    torch.testing.assert_close(out[0], out[2])
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[1], F.linear(x[1], w) * torch.sigmoid(aw[3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ungated_bias(backend):
    """A bias without alpha_bias is added as is, to every sample (B > 1, both ops)."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 2, 5, 5, generator=g), torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, generator=g)
    aw = torch.randn(6, 4, generator=g).requires_grad_(True)
    rows = torch.tensor([5, 0, 2])
    out = ops.wf_conv2d(x, w, b, aw, None, rows, padding=1, backend=backend)
    torch.testing.assert_close(out, ref_conv2d(x, w, b, aw, None, rows, 1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    xl, wl = torch.randn(3, 2, 2, generator=g), torch.randn(4, 2, generator=g)
    out_l = ops.wf_linear(xl, wl, b, aw, None, rows, backend=backend)
    ref_l = torch.stack([F.linear(xl[n], wl) * torch.sigmoid(aw[r]) + b for n, r in enumerate(rows.tolist())])
    torch.testing.assert_close(out_l, ref_l, rtol=1e-5, atol=1e-5)
    (out.sum() + out_l.sum()).backward()
    assert aw.grad[[5, 0, 2]].abs().sum() > 0 and aw.grad[[1, 3, 4]].abs().sum() == 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "x_only"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_torch_backend_without_gate_gradients(mode, has_bias):
    """Without a graph through the gates the torch backend writes its epilogue in place: same values, and the
    graph to x stays intact when only x needs a gradient."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    b = torch.randn(5, generator=g) if has_bias else None
    aw = torch.randn(3, 5, generator=g)
    ab = torch.randn(3, 5, generator=g) if has_bias else None
    xl, wl = torch.randn(3, 2, 4, generator=g), torch.randn(5, 4, generator=g)
    rows = torch.tensor([2, 0, 2])
    ref_c = ref_conv2d(x, w, b, aw, ab, rows, 1, 1, 1, 1)
    ref_l = ref_linear(xl, wl, b, aw, ab, rows)
    if mode == "x_only":
        x.requires_grad_(True)
        out = ops.wf_conv2d(x, w, b, aw, ab, rows, padding=1, backend="torch")
        torch.testing.assert_close(out, ref_c.detach(), rtol=1e-5, atol=1e-5)
        (gx,) = torch.autograd.grad(out.sum(), x)
        (rgx,) = torch.autograd.grad(ref_conv2d(x, w, b, aw, ab, rows, 1, 1, 1, 1).sum(), x)
        torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
        return
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        out_c = ops.wf_conv2d(x, w, b, aw, ab, rows, padding=1, backend="torch")
        out_l = ops.wf_linear(xl, wl, b, aw, ab, rows, backend="torch")
    torch.testing.assert_close(out_c, ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_l, ref_l, rtol=1e-5, atol=1e-5)


def test_rows_none_is_the_plain_layer():
    x, w, b = torch.randn(2, 3, 7, 7), torch.randn(4, 3, 3, 3), torch.randn(4)
    aw = torch.zeros(5, 4)
    assert torch.equal(ops.wf_conv2d(x, w, b, aw, aw, None, padding="same"), F.conv2d(x, w, b, padding="same"))
    xl, wl = torch.randn(2, 3, 6), torch.randn(4, 6)
    assert torch.equal(ops.wf_linear(xl, wl, b, aw, aw, None), F.linear(xl, wl, b))


# ---------------------------------------------------------------------------------------------------------------------
# gradcheck in float64

@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g)
    aw = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ab = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.tensor([2, 0, 2])

    def fn(x, w, aw, ab):
        return ops.wf_conv2d(x, w, b, aw, ab, rows, stride=(1, 2), padding=1, dilation=(2, 1), groups=2,
                             backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, aw, ab))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gradcheck(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g)
    aw = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    ab = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.tensor([1, 1, 2])

    def fn(x, w, aw, ab):
        return ops.wf_linear(x, w, b, aw, ab, rows, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, aw, ab))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input

def _conv_args(num_classes=4, batch=2):
    return (torch.randn(batch, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4), torch.zeros(num_classes, 4),
            torch.zeros(num_classes, 4))


def _linear_args(num_classes=4, batch=2):
    return (torch.randn(batch, 5, 3), torch.randn(4, 3), torch.randn(4), torch.zeros(num_classes, 4),
            torch.zeros(num_classes, 4))


OPS = [(ops.wf_conv2d, _conv_args), (ops.wf_linear, _linear_args)]


@pytest.mark.parametrize("op,make", OPS, ids=["conv2d", "linear"])
@pytest.mark.parametrize("bad", [-1, 4, 17])
def test_out_of_range_row_names_value_and_num_classes(op, make, bad):
    for rows in (bad, torch.tensor([0, bad]), [bad, 1]):
        with pytest.raises(ValueError, match=rf"row {bad}\b.*num_classes=4"):
            op(*make(), rows)


@pytest.mark.parametrize("op,make", OPS, ids=["conv2d", "linear"])
def test_rows_of_wrong_length(op, make):
    for rows in (torch.tensor([0, 1, 2]), torch.tensor([1]), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"shape \[2\]"):
            op(*make(), rows)


@pytest.mark.parametrize("op,make", OPS, ids=["conv2d", "linear"])
def test_float_and_bool_rows_raise_type_error(op, make):
    for rows in (torch.tensor([0.0, 1.0]), torch.tensor([True, False]), 1.0, True, torch.tensor(True)):
        with pytest.raises(TypeError):
            op(*make(), rows)


@pytest.mark.parametrize("op,make", OPS, ids=["conv2d", "linear"])
def test_input_on_another_device(op, make):
    x, w, b, aw, ab = make()
    for rows in (torch.tensor([0, 1]), 1):
        with pytest.raises(ValueError, match="meta"):
            op(x.to("meta"), w, b, aw, ab, rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, aw, ab = (t.requires_grad_(True) for t in _conv_args(batch=0))
    for rows in (torch.zeros(0, dtype=torch.long), 2):
        out = ops.wf_conv2d(x, w, b, aw, ab, rows, padding=1, backend=backend)
        assert out.shape == (0, 4, 5, 5)
        out.sum().backward()
        assert x.grad.shape == x.shape
    xl, wl, bl, awl, abl = (t.requires_grad_(True) for t in _linear_args(batch=0))
    for rows in (torch.zeros(0, dtype=torch.long), 2):
        out = ops.wf_linear(xl, wl, bl, awl, abl, rows, backend=backend)
        assert out.shape == (0, 5, 4)
        out.sum().backward()
        assert awl.grad is None or not awl.grad.any()


def test_bad_shapes_and_arguments():
    x, w, b, aw, ab = _conv_args()
    with pytest.raises(ValueError, match="alpha_weight"):
        ops.wf_conv2d(x, w, b, torch.zeros(4, 5), ab, 0)
    with pytest.raises(ValueError, match="alpha_bias"):
        ops.wf_conv2d(x, w, b, aw, torch.zeros(3, 4), 0)
    with pytest.raises(ValueError, match="without bias"):
        ops.wf_conv2d(x, w, None, aw, ab, 0)
    with pytest.raises(ValueError, match="4-d"):
        ops.wf_conv2d(x[0], w, b, aw, ab, 0)
    with pytest.raises(ValueError, match="padding"):
        ops.wf_conv2d(x, w, b, aw, ab, 0, padding="full")
    with pytest.raises(ValueError, match="strided"):
        ops.wf_conv2d(x, w, b, aw, ab, 0, stride=2, padding="same")
    with pytest.raises(ValueError, match="batch"):
        ops.wf_linear(torch.randn(3), torch.randn(4, 3), None, aw, None, 0)
