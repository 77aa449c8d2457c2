"""PetalLinear: a drop-in ``nn.Linear`` with PETALface's quality-weighted two-branch LoRA.

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

``weight``/``bias`` are frozen; ``lora_A`` (branches × r × in) and ``lora_B`` (branches × out × r)
are trained; branch 0 (``branch_lr``) is weighted by (1 − α), branch 1 (``branch_hr``) by α.
``branches=1`` is plain LoRA (y = x Wᵀ + b + s·D(x Aᵀ Bᵀ)), the paper's feature-layer adapter.

Dropout masks come from a seed on x's device and the layer's ``stream``: inside an ``alpha_scope`` (as
PetalFace runs its backbone) one seed drawn per pass from torch's generator (checkpointed with a run,
so a resumed run draws the same masks); outside one, the layer's own seed drawn once and a stream per
call (no launch per call; not reproduced by a resume). ``inject_petal`` numbers the streams of a model.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from petal_fast.definitions.dropout import mix32
from petal_fast.ops.petal_linear import petal_linear
from petal_fast.ops._graph import compiling, draw_seed

from .context import current_scope

_STREAMS = itertools.count(1)  # each layer's dropout stream: layers that share a seed draw different masks


def _recomputing() -> bool:
    """True while autograd runs a backward pass on this thread: a forward called now is activation
    checkpointing's recomputation (torch.utils.checkpoint, reentrant or not)."""
    return torch._C._current_graph_task_id() != -1


class PetalLinear(nn.Module):
    BRANCH_LR, BRANCH_HR = 0, 1

    def __init__(self, in_features: int, out_features: int, rank: int = 8, scale: float = 1.0,
                 dropout: float = 0.0, bias: bool = True, branches: int = 2,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 weight: nn.Parameter | None = None, bias_param: nn.Parameter | None = None) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if branches not in (1, 2):
            raise ValueError(f"branches must be 1 or 2, got {branches!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not math.isfinite(scale):  # a NaN or infinite scale makes every output NaN
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale, self.dropout, self.branches = rank, float(scale), float(dropout), branches
        factory = {"device": device, "dtype": dtype}
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        weight.requires_grad_(False)
        self.weight = weight
        if bias_param is None and bias:
            bias_param = nn.Parameter(torch.empty(out_features, **factory))
            bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
            nn.init.uniform_(bias_param, -bound, bound)
        if bias_param is not None:
            bias_param.requires_grad_(False)
        self.bias = bias_param
        pdev, pdt = weight.device, (dtype or weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(branches, rank, in_features, device=pdev, dtype=pdt))
        self.lora_B = nn.Parameter(torch.zeros(branches, out_features, rank, device=pdev, dtype=pdt))
        self.reset_adapters()
        self.stream = next(_STREAMS) % 2**31
        self._last_call: tuple = (None, 0, self.stream)  # (α, seed, stream) of the last forward: for a recompute
        self._own_seed: torch.Tensor | None = None  # dropout outside an α scope: drawn once, streams per call
        self._calls = 0
        self._merged_alpha: float | None = None
        self._is_merged = False
        # A merged layer's weight already holds the adapters: saving it with them would double them on
        # reload, so its state dict is refused; a loaded state dict is always an unmerged one.
        self.register_state_dict_pre_hook(_refuse_merged_state_dict)
        self._register_load_state_dict_pre_hook(_loaded_is_unmerged, with_module=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, scale: float = 1.0, dropout: float = 0.0,
                    branches: int = 2) -> "PetalLinear":
        """Wrap an existing ``nn.Linear``: its weight and bias Parameters are reused (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, rank=rank, scale=scale, dropout=dropout,
                   bias=linear.bias is not None, branches=branches, weight=linear.weight,
                   bias_param=linear.bias)

    def reset_adapters(self) -> None:
        """A ~ Kaiming-uniform (as PEFT and the released code), B = 0: the layer starts as the base layer."""
        with torch.no_grad():
            for b in range(self.branches):
                nn.init.kaiming_uniform_(self.lora_A[b], a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        if self._is_merged:
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.dropout if self.training else 0.0
        if not compiling() and _recomputing():
            # activation checkpointing re-runs this forward inside backward, where the α scope of the
            # original forward may be gone or another one active: use what that forward used
            used_alpha, seed, stream = self._last_call
            alpha = used_alpha if alpha is None else alpha
        else:
            scope = current_scope()  # the block's α and its dropout seed
            if scope is not None and self.branches == 2 and alpha is None:
                alpha = scope.alpha
            seed, stream = self._seed(scope, x.device) if p > 0.0 else (0, self.stream)
            if not compiling():  # a plain attribute (nn.Module.__setattr__ costs ~2 µs a call)
                self.__dict__["_last_call"] = (alpha, seed, stream)
        return petal_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                            alpha if self.branches == 2 else None, self.scale, p, seed, stream)

    def _seed(self, scope, device: torch.device) -> tuple[torch.Tensor, int]:
        """(seed tensor on ``device``, stream) of this call's dropout masks, with no host→device copy:

        - in an α scope: the block's seed (one draw for all its layers) and this layer's stream;
        - otherwise, eagerly: this layer's own seed, drawn once, and a stream that hashes the layer's
          stream with a call counter (no kernel launch per call);
        - otherwise, traced: a fresh seed per call (a Python counter would be a constant of the graph).
        """
        if scope is not None:
            seed = scope.seed(self.stream, device)
            if seed is not None:
                return seed, self.stream
        if compiling():
            return draw_seed(device), self.stream
        if self._own_seed is None or self._own_seed.device != device:
            with torch.inference_mode(False):
                self._own_seed = draw_seed(device)
        self.__dict__["_calls"] = self._calls + 1  # (not nn.Module.__setattr__: ~2 µs a call)
        return self._own_seed, int(mix32(self.stream ^ mix32(self._calls))) & 0x7FFFFFFF

    # -- fixed-quality deployment -------------------------------------------------------------
    def delta_weight(self, alpha: float | None = None) -> torch.Tensor:
        """ΔW = s·Σ_k c_k B_k A_k with c = [(1−α), α] (two branches) or [1] (one)."""
        coefs = [1.0] if self.branches == 1 else [1.0 - float(alpha), float(alpha)]
        a, b = self.lora_A.detach().float(), self.lora_B.detach().float()
        return self.scale * sum(c * (b[k] @ a[k]) for k, c in enumerate(coefs))

    @torch.no_grad()
    def merge_(self, alpha: float | None = None) -> "PetalLinear":
        """Fold both branches at a fixed α into W (dropout off); ``unmerge_`` restores W."""
        if self._is_merged:
            raise RuntimeError("PetalLinear is already merged; call unmerge_() first")
        if self.branches == 2 and (alpha is None or not 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"merge_ needs a fixed alpha in [0, 1] for a two-branch layer, got {alpha!r}")
        self.weight.add_(self.delta_weight(alpha).to(self.weight.dtype))
        # ΔW is recomputed at unmerge_ from the (unchanged) adapters: no out×in copy is kept.
        self._merged_alpha, self._is_merged = alpha, True
        return self

    @torch.no_grad()
    def unmerge_(self) -> "PetalLinear":
        if not self._is_merged:
            raise RuntimeError("PetalLinear is not merged")
        self.weight.sub_(self.delta_weight(self._merged_alpha).to(self.weight.dtype))
        self._merged_alpha, self._is_merged = None, False
        return self

    @torch.no_grad()
    def to_linear(self, alpha: float | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer at a fixed α with dropout off: weight W + ΔW(α)
        (W itself if the layer is already merged), the same bias; the adapters are dropped.
        Two-branch layers need α in [0, 1]; one-branch layers take none."""
        if self.branches == 2 and not self._is_merged and (alpha is None or not 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"to_linear needs a fixed alpha in [0, 1] for a two-branch layer, got {alpha!r}")
        weight = self.weight if self._is_merged else (self.weight.float() + self.delta_weight(alpha)).to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    @property
    def last_alpha(self) -> torch.Tensor | None:
        """The α this layer's last forward used (explicit or from its ``alpha_scope``; None for one branch
        or before a call): what its backward, and an activation-checkpointing recompute, use."""
        return self._last_call[0]

    @property
    def merged(self) -> bool:
        return self._is_merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale}, dropout={self.dropout}, branches={self.branches}, "
                f"bias={self.bias is not None}")


def _refuse_merged_state_dict(module: PetalLinear, prefix: str, keep_vars: bool) -> None:
    if module.merged:
        name = prefix[:-1] or "PetalLinear"
        raise RuntimeError(
            f"{name} is merged (alpha={module._merged_alpha}): its weight holds W + ΔW while lora_A/lora_B still "
            "hold the adapters, so saving both would apply the adapters twice when reloaded. Call unmerge_() "
            "(unmerge_petal(model)) before saving, or save only the adapters (adapter_state_dict(model)); "
            "to deploy a merged model, torch.save(model) keeps the merged state with it.")


def _loaded_is_unmerged(module: PetalLinear, state_dict, prefix, local_metadata, strict, missing, unexpected,
                        errors) -> None:
    # Saved state dicts never hold a merged weight (refused above): the layer becomes an unmerged one.
    if module.merged and f"{prefix}weight" in state_dict:
        module._merged_alpha, module._is_merged = None, False
