"""Suites: YAML protocol files -> validated Suite -> frozen RunSpecs.

Loading is strict: every key is checked against the schema below and an error names the file, the key path and
the valid choices, before anything runs. Strings may use ``${VAR}`` / ``${VAR:-default}``; one level of
``include:`` merges a base file under this one (this file wins; lists are replaced, mappings merged);
``--set a.b=v`` overrides are applied after the include (values parsed as YAML; list items by index:
``pairs.0.student.model=...``). Only ``yaml.safe_load`` is used.

This module never imports torch itself: methods, models and datasets are resolved from their metadata
(``kdbench.methodinfo``, ``kdbench.models.catalog``, ``Registry.info``), read without importing the plugins
where it is literal; only a plugin whose metadata is not (or a model name only its library knows) is imported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kdbench.recipe import OPTIMIZERS, RECIPE_CHOICES, RECIPE_KEYS, SCHEDULES, Recipe, RecipeError


class SuiteError(ValueError):
    """A suite is invalid. The message names the file and the key."""


# ---------------------------------------------------------------------------------------------------
# Schema: key -> (required, description). Nested schemas are validated by the functions below.
TOP_KEYS = {
    "suite": "name of the suite (must equal the file stem)",
    "version": "integer; bump it when the suite's numbers can change",
    "description": "free text",
    "include": "one base suite file merged under this one (one level only)",
    "task": "classification | detection | segmentation",
    "data": "mapping: name, root, and the dataset's options",
    "evals": "list of {name: ...}",
    "recipe": "training recipe mapping",
    "pairs": "list of {teacher: ..., student: ...}",
    "methods": "list of method names or {name, label, params}",
    "seeds": "list of integer seeds",
    "resources": "mapping of scheduler resources",
    "reference": "list of published numbers {method, pair, metric, value, source}",
    "plugins": "list of folders of method plugin files, relative to the suite file (as --plugins; no run_id changes)",
}
REQUIRED_TOP = ("suite", "version", "task", "data", "recipe", "pairs", "methods", "seeds")
MODEL_KEYS = {"model", "weights", "kwargs", "train"}
TEACHER_TRAIN_KEYS = {"recipe", "data", "seed", "resources"}
PAIR_KEYS = {"name", "teacher", "student", "params", "recipe", "data"}
METHOD_KEYS = {"name", "label", "params"}
RESOURCE_KEYS = {"gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node",
                 "slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint", "slurm_array_parallelism",
                 "runs_per_gpu", "cohort_size"}
REFERENCE_KEYS = {"method", "pair", "metric", "value", "source"}


# ---------------------------------------------------------------------------------------------------
KINDS = ("teacher", "stage", "distill", "eval")


@dataclass(frozen=True)
class RunSpec:
    """One node of a suite's run graph, as plain data. ``run_id`` hashes what determines its numbers,
    including the run_ids it ``needs`` (so a changed teacher changes every run built on it).

    Kinds: ``teacher`` (train a suite-trained teacher), ``stage`` (a method's pre-distillation artifact,
    ``stage.pt``, e.g. FreeKD's prompts: ``params`` holds only the method's ``stage_params``), ``distill``
    (train a student, the baseline included) and ``eval`` (evaluate a finished model on one chunk of an extra
    evaluation: ``eval`` is the chunk, ``target`` the evaluated model's run_id, ``student`` its model spec).
    """

    suite: str
    suite_version: int
    kind: str
    task: str
    data: dict
    recipe: dict
    student: dict  # {"model", "kwargs", ("weights")}: the trained network (eval: the evaluated one)
    teacher: dict | None  # {"model", "kwargs", ("weights")} or None
    teacher_run: str | None  # run_id of the suite-trained teacher this run loads, if any (also in needs)
    method: str
    method_version: int
    params: dict
    seed: int
    label: str = ""
    pair: str = ""
    pair_index: int = 0
    method_index: int = 0
    resources: dict = field(default_factory=dict)
    reference: tuple = ()
    needs: tuple = ()  # run_ids this run depends on (teacher, stage, evaluated model)
    stage_run: str | None = None  # distill: run_id of the stage run whose stage.pt it loads (also in needs)
    target: str | None = None  # eval: run_id of the evaluated model (a checkpoint teacher: see model_id)
    eval: dict | None = None  # eval: the chunk, e.g. {"name": "corruptions", "corruption": ..., "severities": [...]}
    #: teacher/distill: its training batches are augmented in the training process (no loader workers), with the
    #: draws seeded per batch (``kdbench.train.batch_rng``): part of the run's identity (:func:`batch_rng`)
    batch_rng: bool = False

    @property
    def run_id(self) -> str:
        key = {k: getattr(self, k) for k in ("suite", "suite_version", "kind", "task", "data", "student", "teacher",
                                             "method", "method_version", "params", "seed")}
        key["needs"] = sorted(self.needs)
        if self.kind in ("teacher", "distill"):
            key["recipe"] = self.recipe
            if self.batch_rng:
                key["batch_rng"] = True
        if self.kind == "distill":  # a teacher is shared by every pair that trains the same one; a run is not
            key["pair"] = self.pair
        if self.kind == "stage":  # the stage reads the training data in batches of the recipe's size
            key["recipe"] = {"batch_size": self.recipe["batch_size"]}
        if self.kind == "eval":
            key = {k: key[k] for k in ("suite", "suite_version", "kind", "task", "data", "student", "needs")}
            key.update(eval=self.eval, target=self.target)
        return _digest(key)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_id"] = self.run_id
        return d


def _digest(key: Any) -> str:
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_id(model: dict) -> str:
    """The id a checkpoint teacher (``weights:``) goes by where a run_id is expected (an eval's ``target``, the
    folder of its corruption cells): a hash of its model spec (model, kwargs, weights path). The file's sha256
    is recorded by the runs that load it and checked against what the stage runs recorded."""
    return "w" + _digest({"model": model["model"], "kwargs": model.get("kwargs") or {},
                          "weights": model.get("weights")})[:15]


@dataclass
class Suite:
    path: Path
    raw: dict  # the merged, overridden, env-expanded mapping
    specs: list[RunSpec]
    notes: list[str] = field(default_factory=list)  # accepted but ignored (e.g. params of methods not run)

    @property
    def name(self) -> str:
        return self.raw["suite"]

    @property
    def version(self) -> int:
        return self.raw["version"]

    @property
    def resources(self) -> dict:
        return dict(self.raw.get("resources") or {})


# ---------------------------------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; an unset variable without default is an error."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise SuiteError(f"{where}: environment variable ${{{var}}} is not set (write ${{{var}:-default}})")

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _read_yaml(path: Path) -> dict:
    from kdbench.yamlio import YamlError, load_file  # strict: duplicate keys, size/alias bounds, UTF-8

    try:
        data = load_file(path, what="suite file")
    except YamlError as e:
        raise SuiteError(str(e)) from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_override(data: dict, assignment: str, path: Path) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) in place."""
    if "=" not in assignment:
        raise SuiteError(f"--set {assignment!r}: expected KEY=VALUE (e.g. recipe.epochs=2)")
    key, raw_value = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as e:
        raise SuiteError(f"--set {assignment!r}: value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SuiteError(f"{path}: --set {key}: {where!r} needs a list index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise SuiteError(f"{path}: --set {key}: {'.'.join(parts[:i])!r} is not a mapping or list")


def load_raw(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    path = Path(path)
    data = _read_yaml(path)
    inc = data.pop("include", None)
    if inc is not None:
        if not isinstance(inc, str):
            raise SuiteError(f"{path}: include: must be one file path (one level of include), got {inc!r}")
        inc_path = (path.parent / expand_env(inc, f"{path}: include")).resolve()
        base = _read_yaml(inc_path)
        if "include" in base:
            raise SuiteError(f"{inc_path}: included files cannot include others (one level only; {path} includes it)")
        if isinstance(base.get("plugins"), list):  # relative to the file that names them
            base["plugins"] = [str(inc_path.parent / expand_env(d, f"{inc_path}: plugins")) if isinstance(d, str)
                               else d for d in base["plugins"]]
        data = deep_merge(base, data)
    for ov in overrides:
        apply_override(data, ov, path)
    return expand_env(data, str(path))


# ---------------------------------------------------------------------------------------------------
def _err(path: Path, key: str, msg: str) -> SuiteError:
    return SuiteError(f"{path}: {key}: {msg}")


def _check_keys(path: Path, where: str, mapping: Any, valid: set[str] | dict, required: tuple = ()) -> None:
    if not isinstance(mapping, dict):
        raise _err(path, where, f"expected a mapping, got {type(mapping).__name__} ({mapping!r})")
    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise _err(path, f"{where}.{unknown[0]}" if where else unknown[0],
                   f"unknown key; valid keys here: {', '.join(sorted(valid))}")
    for r in required:
        if r not in mapping:
            raise _err(path, f"{where}.{r}" if where else r, "required key is missing")


def _is_real(v: Any) -> bool:
    """A number as the training loop reads it (``float(v)``): int or float, or a string such as ``"5e-4"`` (YAML
    reads an exponent without a dot as a string)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        float(str(v).strip().replace("_", ""))
    except ValueError:
        return False
    return isinstance(v, str)


def _check_values(path: Path, where: str, mapping: dict) -> None:
    """The values of a recipe's ``optimizer:`` / ``schedule:`` keys, as the training loop reads them."""
    for k, v in mapping.items():
        if k in ("lr", "momentum", "weight_decay", "gamma", "min_lr", "warmup_epochs") and not _is_real(v):
            raise _err(path, f"{where}.{k}", f"expected a number, got {v!r}")
        if k == "nesterov" and not isinstance(v, bool):
            raise _err(path, f"{where}.{k}", f"expected true or false, got {v!r}")
        if k == "betas" and not (isinstance(v, list) and len(v) == 2 and all(_is_real(b) for b in v)):
            raise _err(path, f"{where}.{k}", f"expected a list of two numbers, got {v!r}")
        if k == "milestones" and not (isinstance(v, list) and all(isinstance(m, int) and not isinstance(m, bool)
                                                                  for m in v)):
            raise _err(path, f"{where}.{k}", f"expected a list of epochs (integers), got {v!r}")


def _check_recipe(path: Path, where: str, recipe: dict, partial: bool = False) -> dict:
    _check_keys(path, where, recipe, RECIPE_KEYS, () if partial else ("epochs", "batch_size", "optimizer", "schedule"))
    for k, typ in RECIPE_KEYS.items():
        v = recipe.get(k)
        types_ = typ if isinstance(typ, tuple) else (typ,)
        if k in recipe and (not isinstance(v, typ) or (isinstance(v, bool) and bool not in types_)):
            expected = " or ".join(t.__name__ for t in types_)
            raise _err(path, f"{where}.{k}", f"expected {expected}, got {v!r}")
        if k in recipe and isinstance(v, str) and v not in RECIPE_CHOICES.get(k, ()):
            valid = ", ".join([*(t.__name__ for t in types_ if t is not str), *RECIPE_CHOICES.get(k, ())])
            raise _err(path, f"{where}.{k}", f"unknown value {v!r}; valid: {valid}")
    for k in ("epochs", "batch_size"):
        if k in recipe and recipe[k] < 1:
            raise _err(path, f"{where}.{k}", f"must be >= 1, got {recipe[k]}")
    if "optimizer" in recipe:
        opt = recipe["optimizer"]
        _check_keys(path, f"{where}.optimizer", opt, {"name"} | set().union(*OPTIMIZERS.values()), ("name",) if not partial else ())
        if "name" in opt:
            if opt["name"] not in OPTIMIZERS:
                raise _err(path, f"{where}.optimizer.name", f"unknown optimizer {opt['name']!r}; valid: {', '.join(OPTIMIZERS)}")
            _check_keys(path, f"{where}.optimizer", opt, {"name"} | OPTIMIZERS[opt["name"]])
        _check_values(path, f"{where}.optimizer", opt)
    if "schedule" in recipe:
        sch = recipe["schedule"]
        _check_keys(path, f"{where}.schedule", sch, {"name"} | set().union(*SCHEDULES.values()), ("name",) if not partial else ())
        if "name" in sch:
            if sch["name"] not in SCHEDULES:
                raise _err(path, f"{where}.schedule.name", f"unknown schedule {sch['name']!r}; valid: {', '.join(SCHEDULES)}")
            _check_keys(path, f"{where}.schedule", sch, {"name"} | SCHEDULES[sch["name"]])
            if sch["name"] == "multistep" and "milestones" not in sch:
                raise _err(path, f"{where}.schedule.milestones", "required for the multistep schedule")
        _check_values(path, f"{where}.schedule", sch)
    return recipe


def _check_resources(path: Path, where: str, resources: dict) -> None:
    """Values of the resource keys kdbench itself reads (the others go to the scheduler as they are)."""
    for k in ("gpus_per_node", "cpus_per_task", "runs_per_gpu", "cohort_size"):
        v = resources.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "gpus_per_node" else 1)):
            raise _err(path, f"{where}.{k}", f"expected an integer >= {0 if k == 'gpus_per_node' else 1}, got {v!r}")
    if int(resources.get("runs_per_gpu") or 1) > 1 and int(resources.get("gpus_per_node") or 0) != 1:
        raise _err(path, f"{where}.runs_per_gpu", "packs several runs on one GPU: needs gpus_per_node: 1, got "
                   f"{resources.get('gpus_per_node')!r}")


def _check_data(path: Path, where: str, data: dict, task: str, partial: bool = False) -> None:
    from kdbench.registry import DATASETS

    _check_keys(path, where, data, set(data), () if partial else ("name",))
    if "name" not in data:
        return
    try:
        info = DATASETS.info(data["name"])  # read from the plugin file: no import
        if info is not None:
            plugin_task, options = info.attrs.get("task", "classification"), list(info.params)
        else:
            plugin = DATASETS.get(data["name"])
            plugin_task, options = plugin.task, plugin.option_names()
    except KeyError as e:
        raise _err(path, f"{where}.name", str(e)) from None
    if plugin_task != task:
        raise _err(path, f"{where}.name", f"dataset {data['name']!r} is for task {plugin_task!r}, not {task!r}")
    valid = {"name", "root"} | set(options)
    _check_keys(path, where, data, valid)


def _model_spec(path: Path, where: str, spec: Any, teacher: bool, task: str) -> dict:
    if isinstance(spec, str):
        spec = {"model": spec}
    valid = MODEL_KEYS if teacher else MODEL_KEYS - {"train"}
    _check_keys(path, where, spec, valid, ("model",))
    from kdbench.models.sources import check_model

    try:
        check_model(spec["model"])
    except (ValueError, KeyError) as e:
        raise _err(path, f"{where}.model", str(e)) from None
    from kdbench.tasks import check_model_for_task

    try:
        check_model_for_task(task, spec["model"])
    except ValueError as e:
        raise _err(path, f"{where}.model", str(e)) from None
    if teacher and ("weights" in spec) == ("train" in spec):
        raise _err(path, where, "a teacher needs exactly one of 'weights: PATH' (a checkpoint) or "
                                "'train: {...}' (trained by the suite, cached and shared by every method)")
    if not teacher and "weights" in spec:
        raise _err(path, f"{where}.weights", "students are trained from scratch; weights are not allowed")
    out = {"model": spec["model"], "kwargs": dict(spec.get("kwargs") or {})}
    if "weights" in spec:
        out["weights"] = str(spec["weights"])
    if "train" in spec:
        tr = spec["train"] or {}
        _check_keys(path, f"{where}.train", tr, TEACHER_TRAIN_KEYS)
        _check_keys(path, f"{where}.train.resources", tr.get("resources") or {}, RESOURCE_KEYS)
        _check_resources(path, f"{where}.train.resources", tr.get("resources") or {})
        out["train"] = tr
    return out


def short_model(name: str) -> str:
    return name.split(":", 1)[-1]


def _resolve_method(path: Path, where: str, entry: Any, task: str):
    """-> (MethodInfo, name, label, params): the method's metadata (``kdbench.methodinfo``), torch-free."""
    from kdbench.methodinfo import method_info

    if isinstance(entry, str):
        entry = {"name": entry}
    _check_keys(path, where, entry, METHOD_KEYS, ("name",))
    try:
        cls = method_info(entry["name"])
    except KeyError as e:
        raise _err(path, f"{where}.name", str(e)) from None
    if task not in cls.tasks:
        raise _err(path, f"{where}.name", f"method {entry['name']!r} does not apply to task {task!r} "
                                          f"(it supports {', '.join(sorted(cls.tasks))})")
    params = entry.get("params") or {}
    try:
        cls.check_params(params)
    except ValueError as e:
        raise _err(path, f"{where}.params", str(e)) from None
    return cls, entry["name"], entry.get("label") or entry["name"], params


def _use_plugins(path: Path, plugins: Any) -> None:
    """A suite's ``plugins:``: folders of method plugin files, relative to the suite file, added as ``--plugins``
    adds them (:func:`kdbench.registry.add_plugin_dirs`: the environment the run processes inherit). They are no
    part of any RunSpec, so no run_id depends on where a method's file is. A bad plugin file (anywhere: kdbench's,
    an entry point's, a folder's) is reported here, as itself, not as the first method entry's error."""
    from kdbench.registry import METHODS, RegistryError, add_plugin_dirs

    if plugins is not None:
        if not isinstance(plugins, list) or not all(isinstance(d, str) and d.strip() for d in plugins):
            raise _err(path, "plugins", f"expected a list of folders, got {plugins!r}")
        for i, d in enumerate(plugins):
            try:
                add_plugin_dirs([path.parent / d], where=f"{path}: plugins[{i}]")
            except ValueError as e:
                raise SuiteError(str(e)) from None
    try:
        METHODS.names()  # reads the plugin files (those of the folders just added too)
    except RegistryError as e:
        raise SuiteError(str(e)) from None


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _pair_params(path: Path, where: str, pair_params: Any, labels: list[str], names: list[str],
                 notes: list[str] | None) -> dict:
    """A pair's ``params:`` keyed by method label or name. Params of a registered method that this suite does not
    run (e.g. after ``--set methods=[...]``) are dropped with a note; any other key is an error (a typo)."""
    in_suite = set(labels) | set(names)
    _check_keys(path, where, pair_params, set(pair_params))
    kept = {}
    for key, value in pair_params.items():
        if key in in_suite:
            kept[key] = value
            continue
        from kdbench.registry import METHODS

        if isinstance(key, str) and key in METHODS:
            if notes is not None:
                notes.append(f"{path}: {where}.{key}: ignored, {key!r} is not among this suite's methods "
                             f"({', '.join(labels)})")
            continue
        import difflib

        close = difflib.get_close_matches(str(key), sorted(in_suite), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _err(path, f"{where}.{key}", f"not a method of this suite nor a registered method.{hint} Valid here: "
                                           f"{', '.join(sorted(in_suite))} (params of a registered method that "
                                           f"the suite does not run are ignored)")
    return kept


def validate_and_expand(path: Path, raw: dict, notes: list[str] | None = None) -> list[RunSpec]:
    """Validate the suite and expand it into its run graph. ``notes`` (when given) collects what was accepted but
    ignored, for ``validate`` and ``run --dry-run`` to print."""
    checked = _validate(path, raw)
    specs = _Graph()
    pair_names: list[str] = []
    for p_i, pair in enumerate(raw["pairs"]):
        where = f"pairs[{p_i}]"
        teacher, student, pname, pair_params = _check_pair_entry(path, where, pair, checked, pair_names, notes)
        pair_names.append(pname)
        for_pair = _pair_overrides(path, where, pair, raw, checked)
        teacher_run = _expand_teacher(path, where, teacher, pname, p_i, for_pair, specs)
        for m_i, method in enumerate(checked.methods):
            _expand_method(path, where, m_i, method, teacher, student, teacher_run, pname, p_i, pair_params,
                           for_pair, specs)
    _check_references(path, checked.refs, pair_names, checked.labels)
    return specs.specs


@dataclass
class _Checked:
    """The suite-wide parts of a suite, validated: what every pair's runs are built from."""

    task: str
    data: dict
    eval_chunks: list[dict]
    recipe: dict
    seeds: list[int]
    methods: list[tuple]  # (class or MethodInfo, method name, label, params)
    labels: list[str]
    refs: list[dict]
    common: dict  # suite, suite_version, task, resources


class _Graph:
    """The runs of a suite in the order they are added; a run added twice (the same teacher, stage or eval for
    several pairs or methods) is kept once."""

    def __init__(self) -> None:
        self.specs: list[RunSpec] = []
        self.seen: set[str] = set()

    def add(self, spec: RunSpec) -> str:
        if spec.run_id not in self.seen:
            self.seen.add(spec.run_id)
            self.specs.append(spec)
        return spec.run_id

    def add_evals(self, model: dict, target: str, needs: tuple, of: dict, checked: _Checked) -> None:
        """One eval run per chunk of the suite's evals for the finished model ``model``."""
        for e in eval_specs(model, target, needs, of, checked.eval_chunks, data=checked.data, recipe=checked.recipe,
                            **checked.common):
            self.add(e)


def _validate(path: Path, raw: dict) -> _Checked:
    """Everything of a suite but its pairs: top-level keys, task, data, evals, recipe, seeds, resources, methods,
    the references' keys."""
    from kdbench.tasks import TASK_NAMES

    _check_keys(path, "", raw, TOP_KEYS, REQUIRED_TOP)
    if raw["suite"] != path.stem:
        raise _err(path, "suite", f"must equal the file stem {path.stem!r}, got {raw['suite']!r}")
    if not isinstance(raw["version"], int) or isinstance(raw["version"], bool):
        raise _err(path, "version", f"must be an integer, got {raw['version']!r}")
    task = raw["task"]
    if task not in TASK_NAMES:
        raise _err(path, "task", f"unknown task {task!r}; valid: {', '.join(TASK_NAMES)}")
    _check_data(path, "data", raw["data"], task)
    eval_chunks = _check_evals(path, raw, task)
    recipe = _recipe_identity(path, "recipe", _check_recipe(path, "recipe", raw["recipe"]))
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _err(path, "seeds", f"expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(path, "seeds", f"duplicate seeds in {seeds}")
    resources = raw.get("resources") or {}
    _check_keys(path, "resources", resources, RESOURCE_KEYS)
    _check_resources(path, "resources", resources)
    if not isinstance(raw["pairs"], list) or not raw["pairs"]:
        raise _err(path, "pairs", "expected a non-empty list of {teacher, student}")
    if not isinstance(raw["methods"], list) or not raw["methods"]:
        raise _err(path, "methods", "expected a non-empty list of methods")
    _use_plugins(path, raw.get("plugins"))
    methods = [_resolve_method(path, f"methods[{i}]", m, task) for i, m in enumerate(raw["methods"])]
    labels = [m[2] for m in methods]
    if "teacher" in labels:
        raise _err(path, "methods", "'teacher' is reserved for the teacher row of tables; choose another label")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise _err(path, "methods", f"duplicate label(s) {dup}: give each entry its own 'label:'")
    refs = raw.get("reference") or []
    for i, r in enumerate(refs):
        _check_keys(path, f"reference[{i}]", r, REFERENCE_KEYS, ("method", "pair", "metric", "value"))
    return _Checked(task=task, data=_jsonable(raw["data"]), eval_chunks=eval_chunks, recipe=recipe, seeds=seeds,
                    methods=methods, labels=labels, refs=refs,
                    common=dict(suite=raw["suite"], suite_version=raw["version"], task=task,
                                resources=_jsonable(resources)))


def _check_evals(path: Path, raw: dict, task: str) -> list[dict]:
    """The suite's ``evals:`` checked, as the chunks its eval runs evaluate (``val`` has none)."""
    from kdbench.evals import EvalEntryError, check_eval, chunks, corruption_point
    from kdbench.tasks import TASK_FACTS

    evals = raw.get("evals") or [{"name": "val"}]
    if not isinstance(evals, list):
        raise _err(path, "evals", "expected a list of names or {name: ...}")
    checked_evals = []
    for i, ev in enumerate(evals):
        try:
            checked_evals.append(check_eval(ev, TASK_FACTS[task]["evals"], task))
        except EvalEntryError as e:
            raise _err(path, f"evals[{i}]" + (f".{e.key}" if e.key else ""), str(e)) from None
    generated = [i for i, ev in enumerate(checked_evals) if ev["name"] == "corruptions" and not ev.get("root")]
    if generated:  # corrupted on the fly: every evaluated image must be large enough for the corruption library
        from kdbench.corruptions import MIN_SIDE
        from kdbench.data.plugin import corruption_size_problem

        try:
            problem = corruption_size_problem(raw["data"], MIN_SIDE, light=True)
        except (ImportError, ValueError, TypeError):  # the data check reports bad options and missing packages
            problem = None
        if problem:
            raise _err(path, f"evals[{generated[0]}]", problem)
    point = corruption_point(raw["data"]) if any(ev["name"] == "corruptions" for ev in checked_evals) else "decoded"
    return [c for ev in checked_evals for c in chunks(ev, point)]


def _check_pair_entry(path: Path, where: str, pair: Any, checked: _Checked, pair_names: list[str],
                      notes: list[str] | None) -> tuple[dict, dict, str, dict]:
    """One ``pairs:`` entry checked: its teacher and student specs, its name and its per-method params."""
    _check_keys(path, where, pair, PAIR_KEYS, ("teacher", "student"))
    teacher = _model_spec(path, f"{where}.teacher", pair["teacher"], teacher=True, task=checked.task)
    student = _model_spec(path, f"{where}.student", pair["student"], teacher=False, task=checked.task)
    pname = pair.get("name") or f"{short_model(teacher['model'])}→{short_model(student['model'])}"
    if pname in pair_names:
        raise _err(path, f"{where}.name", f"duplicate pair name {pname!r}")
    pair_params = _pair_params(path, f"{where}.params", pair.get("params") or {}, checked.labels,
                               [m[1] for m in checked.methods], notes)
    return teacher, student, pname, pair_params


def _recipe_identity(path: Path, where: str, recipe: dict) -> dict:
    """A checked recipe's identity (:meth:`Recipe.identity`); a value out of its range (``Recipe.of``) is an error
    naming the file and ``where``."""
    try:
        return Recipe.of(recipe).identity()
    except RecipeError as e:
        raise _err(path, f"{where}.{e.key}", e.reason) from None


def _pair_overrides(path: Path, where: str, pair: dict, raw: dict, checked: _Checked) -> _Checked:
    """The suite-wide parts as one pair's runs see them: the pair's own ``recipe:`` and ``data:`` (partial
    mappings) deep-merged over the suite's, each checked as a whole (e.g. a CNN student and a ViT student of one
    suite trained with their own optimiser, schedule and augmentation). An ``optimizer:`` or ``schedule:`` that
    names another one replaces the suite's instead of merging into it. Without overrides, ``checked`` itself."""
    if not pair.get("recipe") and not pair.get("data"):
        return checked
    recipe, data = checked.recipe, checked.data
    if pair.get("recipe"):
        over = _jsonable(_check_recipe(path, f"{where}.recipe", pair["recipe"], partial=True))
        base = dict(raw["recipe"])
        for k in ("optimizer", "schedule"):  # another optimiser or schedule: the pair's mapping replaces the suite's
            name = (base.get(k) or {}).get("name")
            if isinstance(over.get(k), dict) and over[k].get("name", name) != name:
                base.pop(k, None)
        recipe = _recipe_identity(path, f"{where}.recipe", _check_recipe(path, f"{where}.recipe", deep_merge(base, over)))
    if pair.get("data"):
        if not isinstance(pair["data"], dict):
            raise _err(path, f"{where}.data", f"expected a mapping of data options, got {pair['data']!r}")
        data = deep_merge(checked.data, _jsonable(pair["data"]))
        _check_data(path, f"{where}.data", data, checked.task)
    return replace(checked, recipe=recipe, data=data)


def batch_rng(data: dict, recipe: dict) -> bool:
    """Whether a training run on ``data`` with ``recipe`` augments its batches in the training process: the dataset
    draws random numbers for its training split (its plugin's ``augments``) and the loader has no workers
    (``num_workers`` 0 or ``auto``, which is 0 on CPU). Those draws are seeded per batch (``kdbench.train``), so
    they do not depend on what the method or the student draws; the flag is part of the run_id (the draws differ
    from the global-RNG ones of runs recorded before it). Torch-free (the plugin's metadata is read from its file)."""
    from kdbench.registry import DATASETS

    if (recipe.get("num_workers") or 0) not in (0, "auto"):
        return False
    try:
        info = DATASETS.info(data["name"])
        if info is not None:
            aug = info.attrs.get("augments", True)
            default = (info.params.get(aug) or (None, False))[1] if isinstance(aug, str) else aug
        else:
            plugin = DATASETS.get(data["name"])
            aug = getattr(plugin, "augments", True)
            default = plugin.option_defaults().get(aug, False) if isinstance(aug, str) else aug
    except KeyError:
        return True
    return bool(data.get(aug, default)) if isinstance(aug, str) else bool(aug)


def _expand_teacher(path: Path, where: str, teacher: dict, pname: str, p_i: int, checked: _Checked,
                    specs: _Graph) -> str | None:
    """A pair's teacher: a suite-trained teacher's run (its run_id returned) or a checkpoint (None), and the eval
    runs of either."""
    t_for_runs = {k: v for k, v in teacher.items() if k != "train"}
    t_facts = teacher_facts(pname, p_i)
    if "train" not in teacher:
        specs.add_evals(t_for_runs, model_id(t_for_runs), (), {**t_facts, "seed": 0}, checked)
        return None
    tr = teacher["train"]
    t_recipe = _check_recipe(path, f"{where}.teacher.train.recipe", tr.get("recipe") or {}, partial=True)
    t_data = tr.get("data") or {}
    _check_data(path, f"{where}.teacher.train.data", t_data, checked.task, partial=True)
    t_ref = tuple(_jsonable({k: v for k, v in r.items() if k not in ("method", "pair")})
                  for r in checked.refs if r["method"] == "teacher" and r["pair"] == pname)
    common = checked.common
    t_recipe, t_data = deep_merge(checked.recipe, _jsonable(t_recipe)), deep_merge(checked.data, _jsonable(t_data))
    _recipe_identity(path, f"{where}.teacher.train.recipe", t_recipe)  # its values in range, said at load
    tspec = RunSpec(kind="teacher", reference=t_ref, data=t_data, recipe=t_recipe, student=_jsonable(t_for_runs),
                    teacher=None, teacher_run=None, seed=int(tr.get("seed", 0)), **t_facts,
                    batch_rng=batch_rng(t_data, t_recipe),
                    **{**common, "resources": {**common["resources"], **_jsonable(tr.get("resources") or {})}})
    teacher_run = specs.add(tspec)
    specs.add_evals(t_for_runs, teacher_run, (teacher_run,), {**t_facts, "seed": tspec.seed}, checked)
    return teacher_run


def _expand_method(path: Path, where: str, m_i: int, method: tuple, teacher: dict, student: dict,
                   teacher_run: str | None, pname: str, p_i: int, pair_params: dict, checked: _Checked,
                   specs: _Graph) -> None:
    """One method on one pair: its parameters and pair checked, then its stage run (a method with
    ``stage_params``), its distill run per seed and their eval runs."""
    cls, mname, label, params = method
    over = ({**(pair_params.get(mname) or {}), **(pair_params.get(label) or {})} if mname != label
            else (pair_params.get(mname) or {}))
    try:
        resolved = cls.check_params({**params, **over})
    except ValueError as e:
        raise _err(path, f"{where}.params.{label}", str(e)) from None
    if cls.needs_teacher:
        try:
            cls.check_pair(resolved, teacher["model"], student["model"])
        except ValueError as e:
            raise _err(path, f"methods[{m_i}] ({label}) on {where} ({pname})", str(e)) from None
    ref = tuple(_jsonable({k: v for k, v in r.items() if k not in ("method", "pair")})
                for r in checked.refs if r["method"] == label and r["pair"] == pname)
    t_for_runs = {k: v for k, v in teacher.items() if k != "train"}
    t_needs = (teacher_run,) if (cls.needs_teacher and teacher_run) else ()
    stage_params = tuple(getattr(cls, "stage_params", ()) or ())
    unknown_stage = [k for k in stage_params if k not in resolved]
    if unknown_stage:  # a method's own mistake, said before anything runs
        raise _err(path, f"methods[{m_i}].name", f"method {mname!r} declares stage_params "
                                                 f"{unknown_stage} that are not among its parameters")
    facts = dict(method=mname, method_version=cls.version, label=label, pair=pname, pair_index=p_i, method_index=m_i)
    data, recipe, common = checked.data, checked.recipe, checked.common
    stage_run = None
    if stage_params and cls.needs_teacher:
        stage_run = specs.add(RunSpec(kind="stage", data=data, recipe=_jsonable(recipe), student=_jsonable(student),
                                      teacher=_jsonable(t_for_runs), teacher_run=teacher_run, needs=t_needs,
                                      params=_jsonable({k: resolved[k] for k in stage_params}),
                                      seed=int(resolved.get("stage_seed") or 0),  # seeds the stage's data order
                                      **facts, **common))
    for seed in checked.seeds:
        dspec = RunSpec(
            kind="distill", data=data, recipe=_jsonable(recipe), student=_jsonable(student),
            teacher=_jsonable(t_for_runs) if cls.needs_teacher else None,
            teacher_run=teacher_run if cls.needs_teacher else None, stage_run=stage_run,
            needs=t_needs + ((stage_run,) if stage_run else ()), params=_jsonable(resolved), seed=seed,
            reference=ref, batch_rng=batch_rng(data, recipe), **facts, **common)
        rid = specs.add(dspec)
        specs.add_evals(student, rid, (rid,), dict(params=dspec.params, seed=seed, **facts), checked)


def _check_references(path: Path, refs: list[dict], pair_names: list[str], labels: list[str]) -> None:
    """Every ``reference:`` entry names a pair and a method label (or the teacher) of the suite."""
    for i, r in enumerate(refs):
        if r["pair"] not in pair_names:
            raise _err(path, f"reference[{i}].pair", f"unknown pair {r['pair']!r}; pairs: {', '.join(pair_names)}")
        if r["method"] not in labels + ["teacher"]:
            raise _err(path, f"reference[{i}].method",
                       f"unknown method label {r['method']!r}; valid: {', '.join(labels + ['teacher'])}")


def teacher_facts(pair: str, pair_index: int) -> dict:
    """The facts a teacher's runs (its training as a baseline student, its evals) carry: label "teacher"."""
    from kdbench.methodinfo import method_info  # torch-free: the metadata, not the class

    return dict(method="baseline", method_version=method_info("baseline").version, params={}, label="teacher",
                pair=pair, pair_index=pair_index, method_index=-1)


EVAL_FACTS = ("method", "method_version", "params", "seed", "label", "pair", "pair_index", "method_index")


def eval_specs(model: dict, target: str, needs: tuple, of: dict, chunks: list[dict], *, suite: str,
               suite_version: int, task: str, data: dict, recipe: dict, resources: dict) -> list[RunSpec]:
    """The eval runs of one finished model (one per eval chunk): ``model`` its spec (model, kwargs, weights),
    ``target`` its run_id (a checkpoint teacher: :func:`model_id`), ``of`` the facts it shares with the model's
    run (:data:`EVAL_FACTS`); ``data``, ``recipe``, ``resources`` the suite's own. The one constructor of eval
    runs: the suite's expansion and ``kdbench robustness`` (:func:`run_eval_specs`) both use it."""
    model = {k: v for k, v in model.items() if k != "train"}
    # an eval runs in one process on at most one GPU (evaluation is not distributed); its CPUs corrupt images
    resources = {**resources, **({"gpus_per_node": 1} if int(resources.get("gpus_per_node") or 0) > 1 else {})}
    resources = {k: v for k, v in resources.items() if k not in ("nodes", "tasks_per_node")}
    return [RunSpec(kind="eval", suite=suite, suite_version=suite_version, task=task, data=_jsonable(data),
                    recipe=_jsonable(recipe), student=_jsonable(model), teacher=None, teacher_run=None,
                    target=target, eval=_jsonable(chunk), needs=tuple(needs), resources=_jsonable(resources),
                    reference=(), **{k: of[k] for k in EVAL_FACTS}) for chunk in chunks]


def run_eval_specs(spec: RunSpec, chunks: list[dict], *, data: dict, recipe: dict, resources: dict) -> list[RunSpec]:
    """The eval runs of a finished teacher or distill run ``spec`` (e.g. read back from its ``spec.json``), the
    same RunSpecs (same run_ids) as the suite's expansion makes for it."""
    if spec.kind not in ("teacher", "distill"):
        raise ValueError(f"run {spec.run_id} is a {spec.kind} run; only teacher and distill runs leave a model")
    return eval_specs(spec.student, spec.run_id, (spec.run_id,), {k: getattr(spec, k) for k in EVAL_FACTS},
                      chunks, suite=spec.suite, suite_version=spec.suite_version, task=spec.task, data=data,
                      recipe=recipe, resources=resources)


def spec_from_dict(d: dict) -> RunSpec:
    """A RunSpec from its ``to_dict()`` (a run's ``spec.json``); the stored run_id must match the recomputed one."""
    from dataclasses import fields

    names = {f.name for f in fields(RunSpec)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("needs", "reference"):
        if k in kw:
            kw[k] = tuple(kw[k])
    spec = RunSpec(**kw)
    if d.get("run_id") and spec.run_id != d["run_id"]:
        raise ValueError(f"spec of run {d['run_id']} hashes to {spec.run_id}: written by another kdbench version")
    return spec


def load_suite(path: str | os.PathLike, overrides: list[str] = ()) -> Suite:
    """The suite at ``path`` with the ``--set key=value`` ``overrides`` applied, validated and expanded. An error
    about a key an override set says so (the value came from the command line, not the file)."""
    path = Path(path)
    raw = load_raw(path, list(overrides))
    notes: list[str] = []
    try:
        specs = validate_and_expand(path, raw, notes)
    except SuiteError as e:
        msg = str(e)
        for o in overrides:
            key = o.split("=", 1)[0].strip()
            if msg.startswith(f"{path}: {key}:") or msg.startswith(f"{path}: {key}."):
                raise SuiteError(f"{msg} (set by --set {o})") from None
        raise
    return Suite(path=path, raw=raw, specs=specs, notes=notes)


def package_suites_dir() -> Path | None:
    """The suites folder that comes with this kdbench: ``kdbench/suites`` when packaged with it, else the source
    checkout's ``suites/`` (an editable install); None when neither exists."""
    here = Path(__file__).resolve().parent
    for cand in (here / "suites", here.parent / "suites"):
        if cand.is_dir():
            return cand
    return None


def available_suites() -> list[str]:
    """Names of the suites in ``./suites`` and in the package's suites folder."""
    found: set[str] = set()
    for folder in (Path("suites"), package_suites_dir()):
        if folder is not None and folder.is_dir():
            found |= {p.stem for p in folder.glob("*.yaml")}
    return sorted(found)


def find_suite(arg: str | os.PathLike) -> Path:
    """A suite file from what the user typed: a path as is; a bare name (``quickstart`` or ``quickstart.yaml``)
    is looked up as ``./suites/<name>.yaml``, then in the package's suites folder. An error lists the
    available suites."""
    p = Path(arg)
    if p.is_file():
        return p
    if p.is_dir():
        raise SuiteError(f"{p} is a directory, not a suite file: pass a suite YAML file (e.g. suites/quickstart.yaml); "
                         f"`kdbench ls suites` lists them")
    tried = [str(p)]
    if p.parent == Path(".") and p.name:
        name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
        for folder in (Path("suites"), package_suites_dir()):
            if folder is None:
                continue
            cand = folder / name
            if cand.is_file():
                return cand
            tried.append(str(cand))
    import difflib

    avail = available_suites()
    close = difflib.get_close_matches(p.stem, avail, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise SuiteError(f"suite {str(arg)!r} not found (looked for {', '.join(dict.fromkeys(tried))}).{hint} Available "
                     f"suites: {', '.join(avail) if avail else '(none in ./suites)'}")


def _suite_texts(suite: Suite) -> str:
    """The suite file's text and its include's, as written (before ``${VAR}`` expansion)."""
    texts = []
    try:
        texts.append(suite.path.read_text(encoding="utf-8", errors="replace"))
        inc = re.search(r"^include:\s*['\"]?([^'\"#\n]+?)['\"]?\s*(#.*)?$", texts[0], re.M)
        if inc:
            texts.append((suite.path.parent / expand_env(inc.group(1).strip())).read_text(encoding="utf-8",
                                                                                        errors="replace"))
    except (OSError, SuiteError):
        pass
    return "\n".join(texts)


def env_hint(suite: Suite, var: str, what: str) -> str:
    """How to point ``var`` (KDBENCH_DATA, KDBENCH_CKPT) at ``what``, as this suite uses it."""
    text = re.sub(r"(^|\s)#.*", "", _suite_texts(suite))  # YAML comments may mention the variable too
    m = re.search(r"\$\{%s(?::-([^}]*))?\}" % re.escape(var), text)
    if m is None:
        return f"the paths are written in {suite.path}: correct them there"
    written = m.group(0)
    now = f"{var}={os.environ[var]}" if var in os.environ else (
        f"{var} is not set, so the default {m.group(1)!r} is used" if m.group(1) is not None else f"{var} is not set")
    return (f"{suite.path} reads {what} under {written} ({now}): point {var} at the folder that holds them, "
            f"e.g. `export {var}=/path/to/{what.split()[0]}`")


def _model_files(model: dict) -> list[tuple[str, str]]:
    """(what, path) of the files a model spec loads: its ``weights`` and every ``*weights`` path in its kwargs."""
    out = [("weights", model["weights"])] if model.get("weights") else []
    out += [(f"kwargs.{k}", v) for k, v in sorted((model.get("kwargs") or {}).items())
            if k.endswith("weights") and isinstance(v, str) and v]
    return out


def check_data_available(suite: Suite) -> None:
    """Check that every dataset the suite reads is where it says, in the expected layout, and that every
    checkpoint it loads (teacher weights, backbone weights) is there and is a file torch.load can read (checked
    without torch: a folder, an empty, truncated or unreadable file, or a file of another kind under the name is
    refused; ``models.sources.torch_file_problem``). All problems are reported at once, one line each (every pair
    with a missing teacher checkpoint), with how to point KDBENCH_DATA / KDBENCH_CKPT at them."""
    from kdbench.data.plugin import NOT_FOUND_HINT, check_data  # torch-free (the Task classes import torch)
    from kdbench.models.sources import TORCH_FILE, torch_file_problem  # torch-free

    problems: list[str] = []
    seen = set()
    for spec in suite.specs:
        key = json.dumps(spec.data, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_data(spec.data)
        except (OSError, ValueError) as e:  # the suite's own hint below replaces the data layer's generic one
            problems.append(f"{suite.path}: data: {str(e).replace(NOT_FOUND_HINT, '')}")
    evals = [e if isinstance(e, dict) else {"name": e} for e in suite.raw.get("evals") or []]
    generated = next((i for i, e in enumerate(evals) if e.get("name") == "corruptions" and not e.get("root")), None)
    if generated is not None:  # every plugin now (validate without data asks only the torch-free ones)
        from kdbench.corruptions import MIN_SIDE
        from kdbench.data.plugin import corruption_size_problem

        try:
            problem = corruption_size_problem(suite.raw["data"], MIN_SIDE)
        except (ImportError, ValueError, TypeError):  # bad options and missing packages are reported above
            problem = None
        if problem:
            problems.append(f"{suite.path}: evals[{generated}]: {problem}")
    data_bad = bool(problems)
    missing: dict[tuple, str] = {}  # (pair, side, what, path) -> line, in the order of the pairs
    released_checked: set[tuple] = set()  # (root, corruption) of the released files read
    not_found = False
    checked: dict[str, str | None] = {}  # path -> its problem, each file read once
    for spec in suite.specs:
        root = (spec.eval or {}).get("root")  # released corruption files (CIFAR-100-C layout)
        if root and not Path(root).is_dir() and f"evals: root: {root}" not in " ".join(problems):
            problems.append(f"{suite.path}: evals: root: no folder {root} (the released <corruption>.npy files)")
            data_bad = True
        elif (root and (root, spec.eval["corruption"]) not in released_checked
              and (Path(root) / f"{spec.eval['corruption']}.npy").exists()):  # the file's layout and labels.npy
            released_checked.add((root, spec.eval["corruption"]))
            from kdbench.data.cifar import cifar100c_slice

            try:
                cifar100c_slice(root, spec.eval["corruption"], spec.eval["severities"][0])
            except (OSError, ValueError) as e:
                problems.append(f"{suite.path}: evals: root: {e}")
                data_bad = True
        sides = [("teacher", spec.teacher), ("student", spec.student)]
        for side, model in sides:
            if not model:
                continue
            if spec.label == "teacher":  # a teacher run, or an eval of a teacher: the trained/evaluated net is it
                side = "teacher"
            for what, f in _model_files(model):
                k = (spec.pair_index, side, what, f)
                if k in missing:
                    continue
                if not Path(f).exists():
                    not_found = True
                    missing[k] = (f"{suite.path}: pairs[{spec.pair_index}] ({spec.pair}): {side} {what} not found: "
                                  f"{f}")
                    continue
                if f not in checked:
                    checked[f] = torch_file_problem(f, crc=False)
                if (problem := checked[f]) is not None:
                    missing[k] = (f"{suite.path}: pairs[{spec.pair_index}] ({spec.pair}): {side} {what} {f}: "
                                  f"{problem}; expected {TORCH_FILE}")
    problems += [missing[k] for k in sorted(missing, key=lambda k: (k[0], k[1] != "teacher", k[2], k[3]))]
    if not problems:
        return
    hints = []
    if data_bad:
        hints.append(env_hint(suite, "KDBENCH_DATA", "datasets"))
    if not_found:
        hints.append(env_hint(suite, "KDBENCH_CKPT", "checkpoints"))
    raise SuiteError("\n".join(problems + [f"hint: {h}" for h in hints]))
