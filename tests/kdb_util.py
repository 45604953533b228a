"""Shared test helpers (importable: tests/ is on sys.path under pytest's default import mode)."""


def tiny_suite(**over) -> dict:
    """A digits suite small enough to run in seconds."""
    d = {
        "suite": "tiny",
        "version": 1,
        "task": "classification",
        "data": {"name": "digits", "train_fraction": 0.2},
        "recipe": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                                "weight_decay": 5.0e-4},
                   "schedule": {"name": "cosine"}, "amp": False, "eval_batch_size": 512},
        "pairs": [{"teacher": {"model": "kdbench:resnet8", "train": {"recipe": {"epochs": 2},
                                                                   "data": {"train_fraction": 1.0}}},
                   "student": {"model": "kdbench:resnet8"}}],
        "methods": ["baseline", "kd"],
        "seeds": [0],
    }
    d.update(over)
    return d
