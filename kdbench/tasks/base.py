"""What every task provides to the harness. The training loop and the runner talk to tasks only through this."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from kdbench.registry import DATASETS


class Task:
    name = ""
    evals: tuple[str, ...] = ("val",)
    primary_metric = ""
    metrics: dict[str, bool] = {}  # metric name -> higher is better
    collate = None  # a DataLoader collate_fn, for batches that are not stacked tensors (detection targets)

    def loader(self, dataset, batch_size: int, *, shuffle: bool = False, generator=None, drop_last: bool = False,
               num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                          num_workers=num_workers, collate_fn=self.collate, pin_memory=pin_memory,
                          persistent_workers=persistent_workers and num_workers > 0)

    def to_device(self, x: Any, y: Any, device) -> tuple[Any, Any]:
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def configure_training(self, recipe) -> None:
        """Take what the recipe says about the training loss, before training (``kdbench.train.fit`` and
        ``kdbench bench`` call it). ``label_smoothing`` and ``mixup`` are for classification
        (``ClassificationTask`` overrides this); any other task refuses them: ValueError."""
        from kdbench.recipe import value

        if value(recipe, "label_smoothing") or value(recipe, "mixup") is not None:
            raise ValueError(f"recipe.label_smoothing and recipe.mixup are for classification; the "
                             f"{self.name or type(self).__name__} task takes neither")

    def forward(self, model, x, y, taps):
        """One network's forward for training: ``Outputs``. ``y`` is given to the student (detectors compute
        their losses inside the forward) and is ``None`` for the teacher."""
        return model(x, taps)

    # -- data: a suite's ``data:`` names a dataset plugin of this task; its other keys are the plugin's options
    @classmethod
    def dataset_plugin(cls, name: str):
        plugin = DATASETS.get(name)
        if plugin.task != cls.name:
            valid = ", ".join(sorted(n for n, p in DATASETS.items() if p.task == cls.name))
            raise ValueError(f"dataset {name!r} is for task {plugin.task!r}, not {cls.name}; "
                             f"{cls.name} datasets: {valid}")
        return plugin()

    def check_data(self, data: dict[str, Any]) -> None:
        opts = {k: v for k, v in data.items() if k not in ("name", "root")}
        self.dataset_plugin(data["name"]).check(data.get("root"), **opts)

    def build_data(self, data: dict[str, Any]):
        opts = {k: v for k, v in data.items() if k not in ("name", "root")}
        return self.dataset_plugin(data["name"]).build(data.get("root"), **opts)

    # to implement: build_model, example_input, loss, evaluate
