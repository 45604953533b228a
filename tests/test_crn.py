"""Common random numbers: the batches a run sees do not depend on what its method or student draws."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from kdbench.suite import RunSpec, batch_rng
from kdbench.train import batches


class _Noisy(Dataset):
    """Draws its 'augmentation' from the global torch RNG, as the bundled datasets do."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.rand(3) + i, i


def _collect(draw_between: bool, seed=3, epoch=2):
    torch.manual_seed(123)
    loader = DataLoader(_Noisy(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
    out = []
    for i, (x, y) in batches(loader, 4, seed, epoch, seeded=True):
        out.append((i, x.clone(), y.clone()))
        if draw_between:
            torch.rand(100)  # a method's dropout, a random projection ...
    return out


def test_batches_do_not_depend_on_draws_between_them():
    a, b = _collect(False), _collect(True)
    assert [i for i, *_ in a] == [0, 1, 2, 3]
    for (_, xa, ya), (_, xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = _collect(False, epoch=3)
    assert not torch.equal(a[0][1], other_epoch[0][1])  # each epoch (and batch) has its own stream


def test_making_a_batch_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    loader = DataLoader(_Noisy(), batch_size=4, generator=torch.Generator().manual_seed(0))  # as fit's loaders
    for _ in batches(loader, 2, 0, 1, seeded=True):
        pass
    assert torch.equal(torch.rand(3), expect)


def test_unseeded_batches_draw_from_the_global_rng():
    torch.manual_seed(1)
    b = [x for _, (x, _y) in batches(DataLoader(_Noisy(), batch_size=4), 2, 0, 1, seeded=False)]
    torch.manual_seed(1)
    c = [x for _, (x, _y) in batches(DataLoader(_Noisy(), batch_size=4), 2, 0, 1, seeded=False)]
    assert torch.equal(b[0], c[0]) and len(b) == 2
    torch.manual_seed(2)
    d = [x for _, (x, _y) in batches(DataLoader(_Noisy(), batch_size=4), 2, 0, 1, seeded=False)]
    assert not torch.equal(b[0], d[0])


def test_batch_rng_marks_augmented_runs_without_workers_only():
    assert batch_rng({"name": "cifar100"}, {"num_workers": 0})  # augment defaults to true
    assert batch_rng({"name": "cifar100"}, {"num_workers": "auto"})  # 0 workers on CPU
    assert not batch_rng({"name": "cifar100"}, {"num_workers": 4})  # the workers draw, seeded by the loader
    assert not batch_rng({"name": "cifar100", "augment": False}, {"num_workers": 0})
    assert not batch_rng({"name": "digits"}, {})  # not augmented unless asked
    assert batch_rng({"name": "digits", "augment": True}, {})
    assert batch_rng({"name": "cityscapes"}, {"num_workers": 0})  # always augments


def test_the_flag_is_part_of_the_run_id_only_when_set():
    base = dict(suite="s", suite_version=1, kind="distill", task="classification", data={"name": "digits"},
                recipe={"epochs": 1}, student={"model": "kdbench:resnet8"}, teacher=None, teacher_run=None,
                method="baseline", method_version=1, params={}, seed=0)
    assert RunSpec(**base).run_id != RunSpec(**base, batch_rng=True).run_id
