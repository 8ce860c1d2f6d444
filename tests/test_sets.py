"""Forget SETS of classes per sample (wfnet.sets): the mask / class-list forms of ``forget``, their errors, the
composed gates on every backend (against a per-sample masked-weight reference), gradients through the composition,
torch.compile with no recompile per new set, ``forgetting(...)`` and export of a set."""
import pytest
import torch
import torch.nn as nn

import wfnet
from wfnet import sets
from wfnet.backends import BackendUnavailableError

NC = 4


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1, bias=False),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, NC))


def _wrapped(seed=1):
    wf = wfnet.wrap(_net(), NC)
    g = torch.Generator().manual_seed(seed)
    for p in wf.filter_parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 2)
    return wf


def _mask(sets_, nc=NC):
    return sets.sets_to_mask(sets_, nc)


def _reference(wf, x, mask, how):
    """Per sample: a plain copy of the model whose conv weights / biases are scaled by the composed gates, written
    out literally per class of the set (independent of wfnet.sets.compose_gates)."""
    outs = []
    for n in range(x.shape[0]):
        model = _net()
        model.load_state_dict({k: v for k, v in wf.model.state_dict().items() if "alpha" not in k})
        for (name, layer), plain in zip(wf.filtered_layers().items(), [model[0], model[2]]):
            classes = torch.nonzero(mask[n]).flatten().tolist()
            def compose(alpha):
                sig = torch.sigmoid(alpha.detach())
                top = sig.max(0).values  # the channel's most open row ("relative")
                g = torch.ones(alpha.shape[1])
                for c in classes:
                    if how == "product":
                        g = g * sig[c]
                    elif how == "min":
                        g = torch.minimum(g, sig[c])
                    else:
                        g = g * sig[c] / top
                return g * top if how == "relative" and classes else g

            gw = compose(layer.alpha_weight)
            gb = compose(layer.alpha_bias) if layer.alpha_bias is not None else None
            with torch.no_grad():
                plain.weight.mul_(gw.view(-1, 1, 1, 1))
                if plain.bias is not None:
                    plain.bias.mul_(gb)
        outs.append(model(x[n:n + 1]))
    return torch.cat(outs)


SETS = [[], [2], [0, 3], [3, 1, 2], [0, 1, 2, 3]]


@pytest.mark.parametrize("how", sets.COMPOSITIONS)
@pytest.mark.parametrize("backend", ["torch", "naive", "triton"])
def test_sets_match_the_per_sample_reference_on_every_backend(backend, how):
    if backend == "triton":
        pytest.importorskip("wf_kernels.ops")
    wf = _wrapped()
    x = torch.randn(len(SETS), 3, 6, 6)
    mask = _mask(SETS)
    with wfnet.use_backend(backend), sets.use_composition(how):
        out = wf(x, forget=mask)
        assert torch.equal(out, wf(x, forget=SETS))  # the class-list form is the same mask
    torch.testing.assert_close(out, _reference(wf, x, mask, how), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_set_is_the_original_model_and_a_one_class_set_is_that_row(backend):
    if backend == "triton":
        pytest.importorskip("wf_kernels.ops")
    wf = _wrapped()
    x = torch.randn(3, 3, 6, 6)
    with wfnet.use_backend(backend):
        out = wf(x, forget=[[], [1], []])
        assert torch.equal(out[[0, 2]], wf(x)[[0, 2]])  # bit for bit: every composed gate is exactly 1
        torch.testing.assert_close(out[1], wf(x, forget=1)[1], rtol=1e-6, atol=1e-6)
        # one set for the whole batch: an expanded [1, N_c] mask
        one = torch.tensor([[False, True, False, True]]).expand(3, -1)
        assert torch.equal(wf(x, forget=one), wf(x, forget=[[1, 3]] * 3))


def test_index_rows_keep_their_meaning():
    wf = _wrapped()
    x = torch.randn(2, 3, 6, 6)
    # an int list / 1-d int tensor is one class per sample, not a set
    assert torch.equal(wf(x, forget=[1, 3]), wf(x, forget=torch.tensor([1, 3])))
    torch.testing.assert_close(wf(x, forget=[1, 3]), wf(x, forget=[[1], [3]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, exc, match", [
    ([[1, 1], [2]], ValueError, "lists class 1 twice"),
    ([[1], [4]], ValueError, "class 4, out of range: num_classes=4"),
    ([[1], [-1]], ValueError, "out of range"),
    ([[1], 2], TypeError, "do not mix"),
    ([[1.5], [2]], TypeError, "must be ints"),
    (torch.zeros(2, 5, dtype=torch.bool), ValueError, r"shape \[2, 4\]"),
    (torch.zeros(3, 4, dtype=torch.bool), ValueError, r"shape \[2, 4\]"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "2-d bool mask"),
    (torch.zeros(2, 4, 1, dtype=torch.bool), ValueError, "forget mask must have shape"),
    ([[1], [2], [3]], ValueError, r"shape \[2, 4\]"),
    (torch.tensor([[1, 2], [0, 3]]), ValueError, "bool mask"),
])
def test_bad_sets_are_clear_errors(bad, exc, match):
    wf = _wrapped()
    with pytest.raises(exc, match=match):
        wf(torch.randn(2, 3, 6, 6), forget=bad)


def test_forgetting_context_takes_sets():
    wf = _wrapped()
    x = torch.randn(2, 3, 6, 6)
    mask = _mask([[0, 2], [1]])
    with wfnet.forgetting(wf, mask):
        inner = wf.model(x)
    assert torch.equal(inner, wf(x, forget=mask))


@pytest.mark.parametrize("backend", ["torch", "naive", "triton"])
def test_gate_gradients_flow_through_the_composition(backend):
    if backend == "triton":
        pytest.importorskip("wf_kernels.ops")
    wf = _wrapped()
    x = torch.randn(3, 3, 6, 6)
    mask = _mask([[0, 2], [], [1, 2, 3]])
    with wfnet.use_backend(backend):
        wf(x, forget=mask).square().sum().backward()
    grads = [p.grad.clone() for p in wf.filter_parameters()]
    wf.zero_grad()
    # reference: the torch backend on an explicitly composed, differentiable expression
    with wfnet.use_backend("torch"):
        wf(x, forget=mask).square().sum().backward()
    for g, r in zip(grads, [p.grad for p in wf.filter_parameters()]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # rows of classes used by no sample get no gradient; used ones do
    first = wf.filtered_layers()["0"].alpha_weight.grad
    assert first[[0, 1, 2, 3]].abs().sum(1).gt(0).all()


def test_gradcheck_of_both_compositions():
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    mask = _mask([[0, 2], [1], [], [0, 1, 3]])
    for how in sets.COMPOSITIONS:
        assert torch.autograd.gradcheck(lambda t: sets.compose_gates(t, mask, how), (a,))


def test_a_backend_that_refuses_sets_raises_when_asked_and_auto_falls_back(monkeypatch):
    """The registry's contract the cuda backend relies on (its unsupported() names forget sets; the real one is
    checked on a GPU in test_cuda_ext.py): an explicit request raises with the reason, "auto" takes the next."""
    from wfnet import backends as B

    class Refuses:
        name = "cuda"

        def unsupported(self, op, rows=None, **args):
            return ["forget sets need per-sample gates"] if rows is not None and rows.mask is not None else []

    monkeypatch.setitem(B._loaded, "cuda", Refuses())
    monkeypatch.setitem(B._auto_cache, torch.device("cpu"), (("cuda", "torch"), "test order"))
    wf = _wrapped()
    x = torch.randn(2, 3, 6, 6)
    with wfnet.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="forget sets need per-sample"):
        wf(x, forget=[[0], [1, 2]])
    with wfnet.use_backend("auto"):
        out = wf(x, forget=[[0], [1, 2]])
    with wfnet.use_backend("torch"):
        assert torch.equal(out, wf(x, forget=[[0], [1, 2]]))


@pytest.mark.parametrize("backend, compiler", [("torch", "eager"), ("triton", "aot_eager")])
def test_compile_takes_new_sets_without_recompiling(backend, compiler):
    """fullgraph (no graph break), outputs and gate gradients as eager, and no recompile for a new set once warm
    (the Triton path records its dispatch decision on the first call, which costs one recompile whatever the rows)."""
    if backend == "triton":
        pytest.importorskip("wf_kernels.ops")
    from torch._dynamo.utils import counters

    wf = _wrapped()
    x = torch.randn(3, 3, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(wf, fullgraph=True, backend=compiler)
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(3, NC, generator=g) < 0.5 for _ in range(5)]
    with wfnet.use_backend(backend):
        for i, mask in enumerate(masks):
            if i == 2:
                counters.clear()
            out = compiled(x, forget=mask)
            out.square().sum().backward()
            grads = [p.grad.clone() for p in wf.filter_parameters()]
            wf.zero_grad()
            with wfnet.use_backend("torch"):
                ref = wf(x, forget=mask)
                ref.square().sum().backward()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            for a, b in zip(grads, [p.grad for p in wf.filter_parameters()]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            wf.zero_grad()
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])  # 3 new sets, no new graph
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_export_bakes_a_set():
    wf = _wrapped()
    x = torch.randn(2, 3, 6, 6)
    soft = wfnet.export(wf, [3, 1])
    assert soft.wfnet_export["forget"] == [1, 3]
    torch.testing.assert_close(soft(x), wf(x, forget=[[1, 3], [1, 3]]), rtol=1e-5, atol=1e-5)
    hard = wfnet.export(wf, [1, 3], hard=True)
    closed = sum(r for r, _ in hard.wfnet_export["removed"].values())
    gates = torch.cat([layer.gate([1, 3]) for layer in wf.filtered_layers().values()])
    assert closed == int((gates < 0.5).sum())
    with pytest.raises(ValueError, match="twice"):
        wfnet.export(wf, [1, 1])
    with pytest.raises(ValueError, match="non-empty set"):
        wfnet.export(wf, [])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sets_on_a_gpu(backend):
    """On a GPU: the cuda backend refuses sets when asked (its compiled epilogue reads class rows only) and "auto"
    never hands them to it; triton matches the torch backend in outputs and gate gradients."""
    status = wfnet.backends.backend_status("cuda")[backend]
    if not status["runs_here"]:
        pytest.skip(f"{backend} cannot run here: {status['why_not']}")
    wf = _wrapped().cuda()
    x = torch.randn(4, 3, 6, 6, device="cuda")
    mask = _mask([[0, 2], [], [1], [0, 1, 2, 3]]).cuda()
    if backend == "cuda":
        with wfnet.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="forget sets"):
            wf(x, forget=mask)
        with wfnet.use_backend("auto"):
            out = wf(x, forget=mask)
        with wfnet.use_backend("torch"):
            torch.testing.assert_close(out, wf(x, forget=mask), rtol=1e-4, atol=1e-4)
        return
    with wfnet.use_backend("triton"):
        wf(x, forget=mask).square().sum().backward()
    grads = [p.grad.clone() for p in wf.filter_parameters()]
    wf.zero_grad()
    with wfnet.use_backend("torch"):
        wf(x, forget=mask).square().sum().backward()
    for g, r in zip(grads, [p.grad for p in wf.filter_parameters()]):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ untraining with sets
def test_expand_batch_sets_holds_the_label_in_forget_sets_only():
    from wfnet.untrain import expand_batch_sets

    x, y = torch.randn(10, 1, 2, 2), torch.arange(10) % 6
    inputs, mask, labels, nf = expand_batch_sets(x, y, 6, 3, 4, torch.Generator().manual_seed(0))
    assert inputs.shape[0] == labels.shape[0] == mask.shape[0] == 5 + 3 * 5 and nf == 5
    hit = mask[torch.arange(labels.shape[0]), labels]
    assert hit[:nf].all() and not hit[nf:].any()
    sizes = mask.sum(1)
    assert sizes.min() >= 1 and sizes.max() <= 4 and len(set(sizes.tolist())) > 1
    assert torch.equal(inputs[nf:nf + 5], x[5:]) and torch.equal(labels[:nf], y[:5])
    with pytest.raises(ValueError, match="set_size"):
        expand_batch_sets(x, y, 6, 3, 0, torch.Generator())


def test_untraining_with_sets_moves_every_row_through_the_composition():
    from torch.utils.data import TensorDataset

    from wfnet import untrain as U
    from wfnet.models import SmallCNN

    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 4
    x = torch.randn(48, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    wf = wfnet.wrap(SmallCNN(4, 1, widths=(4, 6, 8)).eval(), 4)
    ds = TensorDataset(x, y)
    cfg = U.recipe("tuned", "cnn", batch_size=16, max_epochs=1, val_per_epoch=1, set_size=3)
    summary = U.untrain(wf, ds, ds, cfg, torch.device("cpu"), progress=False)
    assert summary["config"]["set_size"] == 3 and summary["config"]["set_composition"] == "relative"
    for name, p in wf.named_filter_parameters():
        assert not torch.equal(p, torch.full_like(p, 3.0)), name  # every class row moved
    first = [p.detach().clone() for p in wf.filter_parameters()]
    # the composition the gates train with is the configured one
    U.untrain(wf, ds, ds, U.recipe("tuned", "cnn", batch_size=16, max_epochs=1, val_per_epoch=1, set_size=3,
                                   set_composition="min"), torch.device("cpu"), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(first, wf.filter_parameters()))


# ------------------------------------------------------------------------------------------ set evaluation
def test_random_sets_are_distinct_sorted_and_seeded():
    from wfnet.set_eval import random_sets

    a = random_sets(10, 3, 6, seed=1)
    assert a == random_sets(10, 3, 6, seed=1) and a != random_sets(10, 3, 6, seed=2)
    assert len({tuple(s) for s in a}) == 6 and all(s == sorted(s) and len(set(s)) == 3 for s in a)
    with pytest.raises(ValueError, match="only 10 distinct"):
        random_sets(5, 2, 11)
    with pytest.raises(ValueError, match="set size"):
        random_sets(5, 5, 1)


def test_set_row_counts_forget_and_retain_samples():
    from wfnet.set_eval import set_row

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3, 0])  # class 0: 1/2 right, class 2: 1/2, retain {1, 3}: 3/4
    logits = torch.nn.functional.one_hot(pred, 4).float()
    row = set_row(logits, labels, [0, 2], rlogits=torch.zeros(8, 4))
    assert row["acc_f"] == {0: 50.0, 2: 50.0} and row["acc_r"] == 75.0 and row["acc_f_max"] == 50.0
    assert 0.4 < row["zrf"] < 1.0


# ------------------------------------------------------------------------------------------ command line
def test_cli_evaluates_sets_with_a_retrained_reference_and_exports_a_set(tmp_path, capsys):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from wfnet.cli import main

    run = tmp_path / "run"
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run), "--epochs", "1", "--train-limit", "200", "--test-limit", "100",
                 *common]) == 0
    # untrained with "min": the gates carry it through their file into evaluate, export and wrapped()
    assert main(["untrain", str(run), "--max-epochs", "1", "--set-size", "3", "--set-composition", "min",
                 *common]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--sets", "3,7", "1,4,9", "--set-size", "2", "--num-sets", "1",
                 *common]) == 0
    out = capsys.readouterr().out
    assert "| {3, 7} | retrained without the set |" in out and "| {1, 4, 9} | WF-Net set (min) |" in out
    assert "WF-Net set (relative)" not in out
    assert "{1, 4, 9} | retrained" not in out  # --set-retrain 1: the first set only
    saved = json.loads((run / "eval" / "sets.json").read_text())
    assert saved["sets"][:2] == [[3, 7], [1, 4, 9]] and len(saved["sets"]) == 3
    assert (run / "eval" / "sets.md").read_text().startswith("# Forget sets")
    assert not (run / "eval" / "table1.md").exists()  # a sets request leaves Table 1 alone
    assert (run / "baselines" / "retrain-sets" / "set_3-7.safetensors").exists()
    # export of a set: soft and hard
    r = wfnet.Run.open(run, device="cpu")
    assert r.wrapped().set_composition == "min"
    x = torch.stack([r.data.test[i][0] for i in range(8)])
    for hard in ([], ["--hard"]):
        path = tmp_path / f"m{len(hard)}.safetensors"
        assert main(["export", str(run), "--forget", "7,3", *hard, "--out", str(path), *common]) == 0
        with safe_open(str(path), "pt") as f:
            report = json.loads(f.metadata()["wfnet_export"])
        assert report["forget"] == [3, 7] and report["hard"] == (0.5 if hard else None)
        plain = r.original_model()
        plain.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(plain(x), wfnet.export(r.wrapped(), [3, 7], hard=bool(hard) or None)(x))
    # the soft export is the wrapped model run with the set
    torch.testing.assert_close(wfnet.export(r.wrapped(), [3, 7])(x), r.wrapped()(x, forget=[[3, 7]] * 8),
                               rtol=1e-4, atol=1e-4)
    # clear errors
    for bad in (["--forget", "3,3"], ["--forget", "3,12"]):
        assert main(["export", str(run), *bad, "--out", str(tmp_path / "e.safetensors"), *common]) == 2
    assert main(["evaluate", str(run), "--set-size", "2", *common]) == 2
    assert main(["evaluate", str(run), "--sets", "3,12", *common]) == 2


def test_a_folded_layer_gets_each_samples_set_repeated():
    from wfnet.rows import Rows

    mask = _mask([[0, 2], [], [3]])
    rows = Rows.prepare(mask, NC, 3)
    assert rows.is_set and rows.batch == 3
    folded = rows.on("cpu", 6, folded=True)  # 2 windows per sample, consecutive
    assert torch.equal(folded, mask.repeat_interleave(2, dim=0))
    with pytest.raises(ValueError):
        rows.on("cpu", 6)  # not declared folded: never guessed
    with pytest.raises(TypeError, match="no per-class segments"):
        rows.segments("cpu")


def test_the_model_keeps_the_composition_its_gates_were_untrained_with(tmp_path):
    """``WFModel.set_composition`` governs every routed forward with sets (and layer.gate / export of a set); a
    ``use_composition`` block still overrides it; save_filters stores it and load_filters restores it (older files:
    from their untraining options), so a model loaded later never composes its sets another way than trained."""
    import copy
    import json

    from safetensors.torch import load_file, save_file

    wf = _wrapped()
    x = torch.randn(3, 3, 6, 6)
    mask = _mask([[0, 3], [1, 2], []])
    assert wf.set_composition == sets.DEFAULT_COMPOSITION == "relative"
    wf.set_composition = "product"
    torch.testing.assert_close(wf(x, forget=mask), _reference(wf, x, mask, "product"), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(wf(x, forget=mask), _reference(wf, x, mask, "relative"), rtol=1e-4, atol=1e-5)
    with wfnet.forgetting(wf, mask):  # the context routes with the model's composition too
        torch.testing.assert_close(wf.model(x), _reference(wf, x, mask, "product"), rtol=1e-4, atol=1e-5)
    with sets.use_composition("min"):  # an explicit block wins
        torch.testing.assert_close(wf(x, forget=mask), _reference(wf, x, mask, "min"), rtol=1e-4, atol=1e-5)
    layer = next(iter(wf.filtered_layers().values()))
    prod = torch.sigmoid(layer.alpha_weight[0].detach()) * torch.sigmoid(layer.alpha_weight[3].detach())
    torch.testing.assert_close(layer.gate([0, 3]), prod)
    torch.testing.assert_close(wfnet.export(wf, [0, 3])(x[:1]), _reference(wf, x[:1], mask[:1], "product"),
                               rtol=1e-4, atol=1e-5)
    assert copy.deepcopy(wf).set_composition == "product"
    with pytest.raises(ValueError, match="unknown gate composition"):
        wf.set_composition = "mean"

    path = tmp_path / "filters.safetensors"
    wfnet.save_filters(wf, path)
    assert wfnet.read_filters_metadata(path)["set_composition"] == "product"
    fresh = _wrapped(seed=5)
    assert fresh.set_composition == "relative"
    wfnet.load_filters(fresh, path)
    assert fresh.set_composition == "product"
    torch.testing.assert_close(fresh(x, forget=mask), wf(x, forget=mask))

    # a file written before the key existed: the composition of its untraining options
    meta = wfnet.read_filters_metadata(path)
    del meta["set_composition"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(path), old, metadata={**meta, "untrain": json.dumps({"set_composition": "min"})})
    wfnet.load_filters(fresh, old)
    assert fresh.set_composition == "min"
    save_file(load_file(path), old, metadata={**meta, "set_composition": "mean"})
    with pytest.raises(ValueError, match="unknown set_composition 'mean'"):
        wfnet.load_filters(fresh, old)
    assert fresh.set_composition == "min"  # a refused file changes nothing
