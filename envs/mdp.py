"""The routing MDP itself, shared by the environments and the exported PPO policy (torch only).

Four modes:

``per_sample`` (the Dr.LLM space)
    An episode walks the layers ``0..L-1`` of one prompt; at layer ``t`` the action is
    ``0`` skip, ``1`` execute or ``2`` repeat (``Discrete(3)``); it ends after layer ``L-1``.
``cola`` (the CoLa space)
    Each action names the next block to run (``0..L-1``) or stops (``L``), so
    ``Discrete(L+1)``; the episode ends at a stop or after ``max_steps`` blocks (default
    ``2L``), so its length is bounded.
``per_token``
    As ``per_sample``, but at layer ``t`` the action says which *token groups* run the block:
    ``MultiBinary(G)``, one flat vector (SB3 rejects nested spaces). The real tokens of each
    row are split, in order, into ``G`` contiguous groups of near-equal size (token ``k`` of
    ``n`` is in group ``floor(k * G / n)``); tokens outside the chosen groups pass the block
    unchanged through the executor's ``token_mask``. Compute is the executed (token, block)
    pairs divided by the sample's tokens, in blocks. The token mask changes what is computed,
    not its cost: the dense block still runs on every token, so this mode saves no wall time yet.
``edit`` (edits of the full route, as MCTS's edit space)
    An episode starts from the full route ``0..L-1`` and makes at most ``max_edits`` (K,
    default 4) edits, then ends; it ends earlier at a stop. Edits never reorder, so the route is
    always non-decreasing and is fully described by the passes of each block. The position
    ``p`` of an edit is a *block index* ``0..L-1`` (so an action means the same block whatever
    edits came before). Actions, ``Discrete(2L + 1)``: ``p`` (``0 <= p < L``) skips block ``p``
    (one pass fewer), ``L + p`` repeats block ``p`` (one pass more, run right after its other
    passes), ``2L`` stops. One skip or repeat is one edit of ``search/mcts.py``'s
    ``EditTree.actions`` (skip one entry, or repeat one entry once). **Invalid edits stop**: a
    skip or repeat of a block with no pass left in the route, or a skip that would leave no
    block, ends the episode on the route as it is (deterministic; it counts as no edit). The
    reward comes at the end: the objective's reward of the final route minus the full route's,
    that is the margin gain over the full route minus ``lambda x (blocks - L) / L`` (so, with
    ``lambda > 0``, saving blocks pays and repeating costs). No hard budget (episodes start at
    ``L`` blocks); K < 1 is an error.

Rules every mode shares (the budget and at-least-one rules are enforced by the edit rules above in ``edit``):

* **Hard budget.** With a budget of ``B`` blocks, an action that would exceed it is cut down:
  repeat becomes execute, then skip (``per_sample``); a step that would run more pairs than
  are left skips the layer for every token (``per_token``); the episode stops once ``B``
  blocks have run (``cola``). A route therefore never breaks the budget.
* **At least one block.** A route runs at least one block: a ``per_sample`` episode that
  skipped everything executes layer ``L-1``; a ``cola`` stop before any block runs block ``L-1``.
* **Observation.** ``[z, position, compute]`` (float32): ``z`` is a fixed projection of the
  current hidden state (each real prompt token's state divided by its RMS, mean-pooled over
  the prompt, centred and projected on the top ``obs_dim`` principal components fitted once,
  on identity-route states of the first ``fit_samples`` search samples, whitened and clipped
  to +-``CLIP``); ``position`` is the next layer over ``L`` (``cola``: one past the last block
  run over ``L``) and ``compute`` the blocks used so far over ``L``. In ``edit`` mode it is
  ``[z_1 .. z_m, passes - 1, position, compute]``: ``z_j`` the same projection of the full
  route's state after ``edit_points[j]`` blocks (``m = obs_points``, evenly spaced, the last
  after block ``L-1``; computed once per sample), then each block's passes in the current route
  minus one (``L`` values: -1 skipped, 0 as in the full route, k repeated k more times), the
  edits made so far over ``L`` and the route's blocks over ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerroute.errors import LayerRouteError

MODES = ("per_sample", "cola", "per_token", "edit")
CLIP = 10.0
COUNTS = (0, 1, 2)  # per_sample: passes of the layer for skip / execute / repeat


class EnvError(LayerRouteError, ValueError):
    """A routing environment that cannot run: bad mode or setting, or a non-finite state or reward."""


@dataclass(frozen=True)
class Progress:
    """How far one episode got: steps taken, blocks run (fractional in per_token mode), the chain."""

    t: int = 0
    blocks: float = 0.0
    chain: tuple[int, ...] = ()

    @property
    def last(self) -> int:
        return self.chain[-1] if self.chain else -1


@dataclass(frozen=True)
class MDPSpec:
    """The mode and limits of one routing MDP (what the env and the exported policy agree on)."""

    mode: str
    num_layers: int
    max_blocks: int | None = None
    max_steps: int | None = None  # cola only; default 2L
    token_groups: int = 8  # per_token only
    max_edits: int = 4  # edit only: K
    obs_points: int = 4  # edit only: full-route states observed

    def __post_init__(self):
        if self.mode not in MODES:
            raise EnvError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode == "cola":
            steps = 2 * self.num_layers if self.max_steps is None else self.max_steps
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise EnvError(f"max_steps must be a positive integer, got {self.max_steps!r}")
            object.__setattr__(self, "max_steps", steps)
        if self.mode == "per_token" and (not isinstance(self.token_groups, int) or self.token_groups < 1):
            raise EnvError(f"token_groups must be a positive integer, got {self.token_groups!r}")
        if self.mode == "edit":
            for name, value, high in (("max_edits", self.max_edits, None), ("obs_points", self.obs_points,
                                                                             self.num_layers)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high and value > high):
                    raise EnvError(f"{name} must be an integer of at least 1{f' and at most {high}' if high else ''}"
                                   f", got {value!r}")
            if self.max_blocks is not None:
                raise EnvError(f"mode 'edit' takes no hard budget: its episodes start from the full route "
                               f"({self.num_layers} blocks); penalise compute with lambda instead")

    @property
    def num_actions(self) -> int:
        """Size of the one flat action vector's range: Discrete(n) or MultiBinary(n)."""
        return {"per_sample": 3, "cola": self.num_layers + 1, "per_token": self.token_groups,
                "edit": 2 * self.num_layers + 1}[self.mode]

    def obs_size(self, proj_dim: int) -> int:
        """Length of the observation vector, given the projection's size."""
        if self.mode == "edit":
            return len(self.edit_points) * proj_dim + self.num_layers + 2
        return proj_dim + 2

    @property
    def edit_points(self) -> tuple[int, ...]:
        """``edit``: the full route's blocks run before each observed state (evenly spaced, the last ``L``)."""
        L, m = self.num_layers, self.obs_points
        return tuple(sorted({max(1, k * L // m) for k in range(1, m + 1)}))

    def start(self) -> Progress:
        """The progress of a new episode: nothing run, or (``edit``) the full route and no edit."""
        L = self.num_layers
        return Progress(0, float(L), tuple(range(L))) if self.mode == "edit" else Progress()

    def edit(self, p: Progress, action: int) -> tuple[Progress, bool]:
        """``edit`` mode: the progress after one action (``t`` counts the edits made) and whether the
        episode ends (a stop, an invalid edit, or the K-th edit); see the module docstring."""
        L, a, chain = self.num_layers, int(action), p.chain
        if 0 <= a < 2 * L:
            block, skip = a % L, a < L
            n = chain.count(block)
            if n and not (skip and len(chain) == 1):
                i = chain.index(block)
                chain = chain[:i] + chain[i + 1:] if skip else chain[:i + n] + (block,) + chain[i + n:]
                q = Progress(p.t + 1, float(len(chain)), chain)
                return q, q.t >= self.max_edits
        return p, True  # stop, or an invalid edit: the route stays as it is

    def left(self, p: Progress) -> float:
        return float("inf") if self.max_blocks is None else self.max_blocks - p.blocks

    def apply(self, p: Progress, action: int) -> tuple[tuple[int, ...], Progress, bool]:
        """The blocks one action runs (after the budget and at-least-one rules), the new progress,
        and whether the episode ends (per_sample and cola; per_token is handled by the env)."""
        L = self.num_layers
        if self.mode == "cola":
            a = int(action)
            if a >= L or self.left(p) < 1:  # stop (a stop forced by the budget included)
                chain = (L - 1,) if not p.chain else ()
                return chain, Progress(p.t + 1, p.blocks + len(chain), p.chain + chain), True
            q = Progress(p.t + 1, p.blocks + 1, p.chain + (a,))
            return (a,), q, len(q.chain) >= self.max_steps or self.left(q) < 1
        t = p.t
        c = int(min(COUNTS[int(action)], self.left(p)))
        if t == L - 1 and p.blocks + c == 0:
            c = 1
        chain = (t,) * c
        return chain, Progress(t + 1, p.blocks + c, p.chain + chain), t + 1 >= L

    def features(self, p: Progress) -> list[float]:
        """``[position, compute]`` of the observation."""
        L = self.num_layers
        if self.mode == "edit":  # [passes - 1 per block, edits / L, blocks / L]
            passes = [0] * L
            for b in p.chain:
                passes[b] += 1
            return [min(n - 1.0, CLIP) for n in passes] + [p.t / L, min(p.blocks / L, CLIP)]
        pos = (p.last + 1) / L if self.mode == "cola" else p.t / L
        return [pos, min(p.blocks / L, CLIP)]


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] states and [B, T] masks -> [B, H]: each token's state over its RMS, averaged over
    the masked-in tokens."""
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    m = mask.to(h.device, h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass
class ObsProjection:
    """The fixed projection of pooled states: ``z = clip(((v - mean) @ components.T) / scale)``."""

    mean: torch.Tensor  # [H]
    components: torch.Tensor  # [k, H]
    scale: torch.Tensor  # [k]
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @classmethod
    def fit(cls, vectors: torch.Tensor, dim: int, **meta) -> ObsProjection:
        """PCA of ``vectors`` [N, H] (top ``dim`` components, whitened)."""
        n, h = vectors.shape
        if not isinstance(dim, int) or not 1 <= dim <= min(n - 1, h):
            raise EnvError(f"obs_dim must be in 1..{min(n - 1, h)} (from {n} fitted states of size {h}), got {dim!r}")
        v = vectors.double()
        mean = v.mean(0)
        _, s, vt = torch.linalg.svd(v - mean, full_matrices=False)
        comps = vt[:dim]
        comps = comps * torch.where(comps.sum(1, keepdim=True) < 0, -1.0, 1.0)  # deterministic signs
        scale = (s[:dim] / max(n - 1, 1) ** 0.5).clamp(min=1e-6)
        return cls(mean.float(), comps.float(), scale.float(), {"fit_vectors": n, **meta})

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        dev = pooled.device
        z = ((pooled.float() - self.mean.to(dev)) @ self.components.to(dev).T) / self.scale.to(dev)
        return z.clamp(-CLIP, CLIP)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"obs.mean": self.mean, "obs.components": self.components, "obs.scale": self.scale}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict | None = None) -> ObsProjection:
        return cls(tensors["obs.mean"], tensors["obs.components"], tensors["obs.scale"], dict(meta or {}))


def observe(spec: MDPSpec, proj: ObsProjection, pooled: torch.Tensor, progress) -> torch.Tensor:
    """Observations [B, spec.obs_size(proj.dim)] (float32, CPU) from pooled states [B, H] (``edit``:
    [B, m, H], the full route's states at ``spec.edit_points``) and each row's progress."""
    feats = torch.tensor([spec.features(p) for p in progress], dtype=torch.float32)
    return torch.cat([proj(pooled).flatten(1).cpu(), feats], dim=1)


def full_route_points(points, state, advance, read) -> tuple[list, torch.Tensor]:
    """Walk the full route from ``state`` (no block run), stopping after each of ``points`` blocks:
    the states there and ``read`` of each, stacked [B, len(points), ...]. ``advance(state, chain)``
    runs the same blocks on every row."""
    states, out, ran = [], [], 0
    for k in points:
        state = advance(state, tuple(range(ran, k)))
        out.append(read(state))
        check_finite(out[-1], f"after block {k - 1} of the full route")
        states.append(state)
        ran = k
    return states, torch.stack(out, 1)


def check_finite(hidden: torch.Tensor, where: str) -> None:
    """Refuse to go on (or train) on NaN or inf states."""
    if not bool(torch.isfinite(hidden).all()):
        raise EnvError(f"non-finite hidden state {where}: the model produced NaN or inf along this route; "
                       f"refusing to continue (check the model's weights and dtype)")


def fresh_progress(n: int) -> list[Progress]:
    return [Progress() for _ in range(n)]


__all__ = ["CLIP", "EnvError", "MDPSpec", "MODES", "ObsProjection", "Progress", "check_finite", "fresh_progress",
           "full_route_points", "observe", "pool"]
