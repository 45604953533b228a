"""The base of the frequency-prompt methods, FreeKD (docs/methods.md §7) and AFP (§9): :class:`PromptDistiller`.

It wires what both methods share: the tap and its level pairing, one frozen
:class:`~kdbench.prompts.PromptSet` per distilled teacher map, the relational gates of §7.5
(:mod:`kdbench.channel_gates`), regression KD for detectors, and the stage hooks of the method contract with
the stage-1 loop of :mod:`kdbench.prompt_stage`. Each method's loss is in its own file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdbench.channel_gates import RelationalGates
from kdbench.featuremap import has_regression_taps, map_shapes, pair_levels, reg_kd_loss, resolve_tap
from kdbench.freq import check_levels, clamp_levels
from kdbench.method import Context, Distiller, Outputs, Taps
from kdbench.prompt_losses import DISSIMILARITIES
from kdbench.prompt_stage import run_prompt_stage
from kdbench.prompts import PromptSet


class PromptDistiller(Distiller):
    """Base of the frequency-prompt methods (FreeKD, AFP).

    Builds what both need from the Context: the tap (``default_taps[task]`` for ``tap="auto"``), its maps
    paired deepest-aligned (``s_index``/``t_index``, the paired ``s_shapes``/``t_shapes``), the DWT depth
    ``map_levels[l]`` of each teacher map (``levels`` on every map, the zero-padded Haar DWT taking any size,
    as FreeKD's release; with ``cap_levels = True``, AFP's ``min(levels, ⌊log2(min(H,W))⌋)``), one frozen
    ``prompt_set`` per map with ``J_l ≥ 1`` (``self.prompts``, keyed by the pair's position; ``self.prompted``
    lists ``(position, key)``), and the regression-KD switch ``use_reg`` (detection with a ``"reg"`` tap on
    both networks).

    Stage 1 (§7.4): :meth:`run_stage` tunes fresh prompts, seeded by ``stage_seed``, on the frozen teacher with
    :func:`run_prompt_stage`; :meth:`load_stage` loads and freezes them. The stage depends on exactly the
    ``stage_params`` (and the teacher, the student's tap count for the pairing, the data and the batch size).
    """

    #: the constructor params that determine the stage-1 prompts (the harness runs the stage once per value)
    stage_params = ("num_tokens", "levels", "tap", "stage_iters", "stage_lr", "stage_optimizer", "stage_seed",
                    "dissimilarity", "dis_weight")
    default_taps: dict[str, str] = {}
    prompt_set: type[PromptSet] = PromptSet
    #: ``J_l = min(levels, ⌊log2(min(H, W))⌋)`` per map (AFP, §9) instead of ``levels`` on every map (FreeKD, §7)
    cap_levels: bool = False

    def __init__(self, ctx: Context, *, num_tokens: int, levels: int, tap: str, reg_weight: float, stage_iters: int,
                 stage_lr: float, stage_optimizer: str, stage_seed: int, dissimilarity: str, dis_weight: float):
        super().__init__(ctx)
        who = self.who = getattr(type(self), "registry_name", type(self).__name__)
        if dissimilarity not in DISSIMILARITIES:
            raise ValueError(f"{who}: dissimilarity must be one of {sorted(DISSIMILARITIES)}, got {dissimilarity!r}")
        if stage_optimizer not in ("adam", "sgd"):
            raise ValueError(f"{who}: stage_optimizer must be 'adam' or 'sgd', got {stage_optimizer!r}")
        if int(num_tokens) != num_tokens or num_tokens < 1:
            raise ValueError(f"{who}: num_tokens must be a positive integer, got {num_tokens!r}")
        self.tap = resolve_tap(ctx, tap, self.default_taps, who)
        self.s_index, self.t_index = pair_levels(ctx, self.tap, who, deepest=True)
        s_shapes, t_shapes = map_shapes(ctx, "student", self.tap, who), map_shapes(ctx, "teacher", self.tap, who)
        self.s_shapes, self.t_shapes = [s_shapes[i] for i in self.s_index], [t_shapes[i] for i in self.t_index]
        self.t_channels = [sh[0] for sh in self.t_shapes]
        levels = check_levels(levels)
        self.map_levels = [clamp_levels(levels, sh[1:]) if self.cap_levels else levels for sh in self.t_shapes]
        if not any(self.map_levels):
            raise ValueError(f"{who}: no teacher map of tap {self.tap!r} is large enough for a DWT level "
                             f"(shapes {self.t_shapes})")
        self.reg_weight = float(reg_weight)
        self.use_reg = has_regression_taps(ctx, self.reg_weight != 0.0)
        self.num_tokens = int(num_tokens)
        self.prompted = [(i, str(i)) for i, j in enumerate(self.map_levels) if j > 0]
        self._stage = {"iters": int(stage_iters), "lr": float(stage_lr), "optimizer": stage_optimizer,
                       "dissimilarity": dissimilarity, "dis_weight": float(dis_weight), "seed": int(stage_seed)}
        self.prompts = self._seeded_prompts()
        self.prompts.requires_grad_(False)

    def _seeded_prompts(self) -> nn.ModuleDict:
        """Fresh prompt sets whose tokens depend only on ``stage_seed`` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._stage["seed"])
            return nn.ModuleDict({k: self.prompt_set(self.t_channels[i], self.num_tokens, self.map_levels[i])
                                  for i, k in self.prompted})

    def relational_gates(self) -> nn.ModuleDict:
        """One :class:`RelationalGates` per prompted map (§7.5), trained with the student."""
        return nn.ModuleDict({k: RelationalGates(self.t_channels[i]) for i, k in self.prompted})

    def taps(self) -> Taps:
        extra = ("reg",) if self.use_reg else ()
        return Taps(student=(self.tap,) + extra, teacher=(self.tap,) + extra)

    def teacher_maps(self, t: Outputs) -> list[Tensor]:
        """The paired teacher maps, detached, fp32."""
        feats = t[self.tap]
        return [feats[i].detach().float() for i in self.t_index]

    def reg_terms(self, s: Outputs, t: Outputs) -> dict[str, Tensor]:
        """``{"loss_reg": reg_weight·reg_kd_loss}`` when ``use_reg``, else nothing."""
        if not self.use_reg:
            return {}
        return {"loss_reg": self.reg_weight * reg_kd_loss(s["reg"], [r.detach() for r in t["reg"]])}

    # -- the stage (method contract) ------------------------------------------------------------
    def stage_config(self) -> dict:
        first = self.prompts[self.prompted[0][1]]
        return {
            "kind": "frequency_prompts",
            "prompt_set": type(first).__name__,
            "tap": self.tap,
            "teacher_indices": {k: self.t_index[i] for i, k in self.prompted},
            "channels": {k: ps.channels for k, ps in self.prompts.items()},
            "levels": {k: ps.levels for k, ps in self.prompts.items()},
            "num_tokens": first.num_tokens,
            **self._stage,
        }

    def run_stage(self, teacher: nn.Module, loader, device) -> dict[str, Tensor]:
        """Train fresh (seeded) prompt sets on the frozen teacher; returns their state dict (CPU)."""
        device = torch.device(device)
        prompts = self._seeded_prompts().to(device)
        prompts.requires_grad_(True)
        n_maps = len(teacher.tap_modules(self.tap))
        if any(self.t_index[i] >= n_maps for i, _ in self.prompted):
            raise ValueError(f"teacher.tap_modules({self.tap!r}) gave {n_maps} modules; the prompts need "
                             f"indices {sorted(self.t_index[i] for i, _ in self.prompted)} of the tap's maps")
        targets = [(self.t_index[i], prompts[k]) for i, k in self.prompted]
        st = self._stage
        self.stage_log = run_prompt_stage(teacher, loader, device, self.tap, targets, task_loss=self.ctx.task_loss,
                                          iters=st["iters"], lr=st["lr"], optimizer=st["optimizer"],
                                          dissimilarity=st["dissimilarity"], dis_weight=st["dis_weight"])
        return {k: v.detach().cpu() for k, v in prompts.state_dict().items()}

    def load_stage(self, state: dict[str, Tensor]) -> None:
        """Load the stage-1 prompts (strict) and freeze them."""
        self.prompts.load_state_dict(state, strict=True)
        self.prompts.requires_grad_(False)
        self._stage_loaded = True

    def check_stage(self) -> None:
        """Raise unless :meth:`load_stage` ran (distilling with untuned prompts would be silently wrong)."""
        if not getattr(self, "_stage_loaded", False):
            raise RuntimeError(f"{self.who}: the stage-1 prompts were never loaded; call run_stage and load_stage "
                               "(the runner does) before distilling")
