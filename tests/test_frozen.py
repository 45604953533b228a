"""The frozen teacher's forward as an optimized inference graph on the CPU (kdbench/models/frozen.py, installed by
kdbench.perf.prepare_models): same outputs within float rounding, and the eager forward wherever the graph could
differ from it (gradients on, changed weights, new hooks, autocast)."""

from __future__ import annotations

import pytest
import torch
from kdb_util import assert_same_step, one_classification_step

from kdbench.models import frozen
from kdbench.models.sources import build_model
from kdbench.registry import METHODS
from kdbench.tasks.classification import ClassificationTask
from kdbench.perf import prepare_models

TAPS = ("stages", "stages_preact", "pooled", "module:layer2.0.conv1")


def _teacher():
    torch.manual_seed(0)
    t = build_model("kdbench:resnet20", 10, 3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x, _ = prepare_models(None, t, None, torch.device("cpu"), x, task=ClassificationTask())
    return t, x


def _graphs(t):
    return [g for g in t.forward.graphs.values() if g is not frozen._FAILED]


def _assert_close(a, b):
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert a.feats.keys() == b.feats.keys()
    for k in a.feats:
        assert len(a.feats[k]) == len(b.feats[k]), k
        for u, v in zip(a.feats[k], b.feats[k]):
            assert u.shape == v.shape and torch.allclose(u, v, rtol=1e-4, atol=1e-5), k
            assert u.is_contiguous(memory_format=torch.channels_last) == v.is_contiguous(
                memory_format=torch.channels_last), k


def test_graph_made_once_and_same_outputs_and_taps():
    t, x = _teacher()
    assert isinstance(t.forward, frozen.FrozenForward)
    with torch.no_grad():
        first = t(x, TAPS)  # the graph is made, checked against the eager forward and used
        assert len(_graphs(t)) == 1
        got = t(x, TAPS)
        eager = t.forward.eager(x, TAPS)
    _assert_close(got, eager)
    for a, b in zip(first.feats["stages"] + [first.logits], got.feats["stages"] + [got.logits]):
        assert torch.equal(a, b)  # the first call already ran the graph: a resumed run computes the same
    with torch.no_grad():  # another batch shape: the same graph, checked once more; another tap set: a graph
        small = t(x[:2], TAPS)
        t(x, ())
    assert len(_graphs(t)) == 2 and len(t.forward.checked) == 3 and all(t.forward.checked.values())
    _assert_close(small, t.forward.eager(x[:2], TAPS))


def test_graph_not_used_when_the_eager_forward_could_differ():
    t, x = _teacher()
    with torch.no_grad():
        t(x, ("stages",))
        t(x, ("stages",))
    assert len(_graphs(t)) == 1

    # new weights (load_state_dict copies in place): the graph holds the old ones, so it is not used again
    other = build_model("kdbench:resnet20", 10, 3)
    prepare_models(None, other, None, torch.device("cpu"), x, task=ClassificationTask())
    t.load_state_dict(other.state_dict())
    with torch.no_grad():
        got = t(x, ("stages",))
        ref = other.forward.eager(x, ("stages",))
    _assert_close(got, ref)

    # a hook that edits a tap (a prompt stage): the eager forward runs with it
    t2, x2 = _teacher()
    with torch.no_grad():
        t2(x2, ("stages",))
        plain = t2(x2, ("stages",))
        with t2.edit_tap("module:layer1", lambda i, f: f * 0.0):
            edited = t2(x2, ("stages",))
    assert plain.feats["stages"][0].abs().sum() > 0
    assert edited.feats["stages"][0].abs().sum() == 0

    # gradients on (stage-1 prompt tuning back-propagates through the teacher) and autocast: eager
    t3, x3 = _teacher()
    t3(x3, ())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            t3(x3, ())
    assert not t3.forward.graphs


def test_env_switch_and_invalid_value(monkeypatch):
    monkeypatch.setenv(frozen.ENV, "eager")
    t, _ = _teacher()
    assert not isinstance(t.forward, frozen.FrozenForward)
    monkeypatch.setenv(frozen.ENV, "fast")
    with pytest.raises(ValueError, match="KDBENCH_TEACHER_GRAPH='fast'.*'frozen'.*'eager'"):
        _teacher()
    monkeypatch.delenv(frozen.ENV)
    t, _ = _teacher()
    frozen.uninstall(t)
    assert not isinstance(t.forward, frozen.FrozenForward)


def test_untraceable_outputs_keep_the_eager_forward():
    class Odd(torch.nn.Module):  # an output with a non-tensor extra: never traced
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x, taps=()):
            from kdbench.method import Outputs

            return Outputs(logits=self.conv(x).mean((2, 3)), extras={"note": "x"})

    net = Odd().eval().requires_grad_(False)
    frozen.install(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert list(net.forward.graphs.values()) == [frozen._FAILED]
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items()
                                        if "classification" in c.tasks and c.needs_teacher))
def test_teacher_graph_same_loss_and_grads_for_every_method(name, monkeypatch):
    """Loss terms and student gradients of one step whose teacher forward runs eagerly or as the graph."""
    steps = []
    for mode in ("eager", "frozen"):
        monkeypatch.setenv(frozen.ENV, mode)
        steps.append(one_classification_step(name, fold=True, teacher_warmup=True))
        fwd = steps[-1][2].forward
        assert isinstance(fwd, frozen.FrozenForward) == (mode == "frozen")
        if mode == "frozen":
            assert len(_graphs(steps[-1][2])) == 1  # made on the warm-up forward, used by the step's
    assert_same_step(*steps)


def test_a_shape_the_graph_cannot_take_runs_eagerly():
    from kdbench.method import Outputs

    class Pooled(torch.nn.Module):  # oneDNN's adaptive pooling takes only sizes its output divides
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, taps=()):
            return Outputs(logits=torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 3).flatten(1))

    net = Pooled().eval().requires_grad_(False).to(memory_format=torch.channels_last)
    frozen.install(net)
    x9 = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    x8 = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net(x9)
        out = net(x8)
        again = net(x8)
        ref = net.forward.eager(x8)
    assert len(_graphs(net)) == 1
    assert sorted(net.forward.checked.values()) == [False, True]  # 9×9 runs the graph, 8×8 the eager forward
    assert torch.equal(out.logits, ref.logits) and torch.equal(again.logits, ref.logits)
