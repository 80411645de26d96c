"""Per-layer routers (Dr.LLM style) and the prefill walk that lets them pick each sample's route.

Router ``i`` is a bottleneck MLP (``Linear(hidden, 128)``, GELU, ``Linear(128, 3)`` by default)
that reads the hidden state *entering* block ``i``, over the prompt's real tokens only: the
tokens are cut into ``min(windows, T)`` contiguous windows (``T`` = that sample's real length,
so left padding and mixed lengths in a batch are handled), each window's mean goes through the
router, and the logits are averaged over the windows. The three outputs are
``skip / execute / repeat`` (0, 1 or 2 passes of block ``i``).

``route_prompts`` decides once, at prefill, layer by layer as the hidden state flows: at layer
``i`` it reads each sample's state, decides, and advances each sample along ``[]``, ``[i]`` or
``[i, i]`` (one batched executor call per layer). The resulting route is then fixed for every
decoded token, which keeps the KV cache consistent (Dr.LLM re-decides at every decode step).

Confidence threshold ``tau`` (the routers' default rule since it was added): a block is skipped
or repeated only where the router's probability for that action exceeds ``tau``; otherwise it
executes. So ``tau = 1`` runs the full model exactly, and unsure routers fall back to it.
``train-router`` chooses ``tau`` on the validation split (``routers/tau.py``) and saves it in the
config; ``--tau`` overrides it. A config saved before ``tau`` existed loads with a warning and
keeps its old rule, the most likely action (``tau`` None).

Budget (optional): with a budget of ``B`` blocks, a layer may only take an action that still fits in what
is left (``B`` minus the blocks already chosen): a repeat the budget cannot pay for becomes an
execute, and once the budget is spent every later layer is skipped. So routers that ask for
more than ``B`` lose their *last* blocks; train them with the budget in mind. A route always
runs at least one block: if every router skipped, the last block runs.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from layerroute.budget import Budget
from layerroute.config import option
from layerroute.errors import FingerprintMismatchError, LayerRouteError
from layerroute.executor import RouteExecutor, RouteKVCache, RoutedOutput
from layerroute.route import ACTIONS, Route
from layerroute.store import check_tensors, check_weights_digest, describe_file, read_json, read_safetensors

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "routers.safetensors"
CONFIG_TYPE = "router"
CONFIG_VERSION = 1
REPEAT_PASSES = 2  # passes of a block whose action is "repeat"
LIMITS = {"bottleneck": 16384, "windows": 1024}  # sizes beyond these only exhaust memory (the default is 128, 8)


class RouterError(LayerRouteError, ValueError):
    """A router directory or config that is missing, corrupt, or made for another base model."""


def check_config_header(data, source: str, type_: str, version: int, what: str) -> None:
    """Refuse a saved config that is not a JSON object of ``type_`` at a version this layerroute reads."""
    if not isinstance(data, dict):
        raise RouterError(f"{source} is not a JSON object")
    if data.get("type") != type_:
        raise RouterError(f"{source} is not a layerroute {what} config (type {data.get('type')!r}, expected {type_!r})")
    if not isinstance(data.get("version"), int) or data["version"] > version:
        raise RouterError(f"{source} has version {data.get('version')!r}; this layerroute reads {what} configs up to "
                          f"version {version}")


def config_from_dict(cls, data: dict, source: str):
    """``cls(**data)`` of a checked config: unknown keys are warned about and dropped (newer files still load)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown keys {', '.join(unknown)} (written by a newer layerroute?)",
                      stacklevel=3)
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise RouterError(f"{source} is malformed: {exc}") from None


def load_router_dir(directory: str | Path, model: nn.Module, kind: str, config_cls, network_cls, config_name: str,
                    weights_name: str, route_file_hint: str = "") -> nn.Module:
    """The ``network_cls`` saved in ``directory`` by ``layerroute train-KIND`` (``kind``: ``"router"`` or
    ``"token router"``), checked against the frozen ``model``: a directory, a config of the model's shape and
    weights digest, and weights of the config's shapes; on ``model``'s device, in eval mode, frozen. Each
    refusal is a ``RouterError`` that says what to run instead (``route_file_hint`` where a route file was given)."""
    from layerroute.models import ModelFingerprint, model_fingerprint

    directory, dashed = Path(directory), kind.replace(" ", "-")
    if directory.is_file():
        what = describe_file(directory)
        raise RouterError(f"{directory} is {what}, not a {dashed} directory (train-{dashed} writes one, with "
                          f"{config_name} and {weights_name})" + (route_file_hint if what == "a route file" else ""))
    if not directory.is_dir():
        raise RouterError(f"{dashed} directory {directory} does not exist")
    config = config_cls.load(directory)
    try:
        ModelFingerprint.from_dict(config.model).check_matches(model_fingerprint(model), kind)
    except FingerprintMismatchError as exc:
        raise RouterError(f"{directory}: {exc}") from None
    check_weights_digest(model, config.weights_digest, directory, RouterError,
                         f"{kind} ({config.base_model or 'unnamed base'})",
                         f"train the {kind}s again on this checkpoint (layerroute train-{dashed})")
    path = directory / weights_name
    tensors = read_safetensors(path, RouterError, f"{directory}: the {dashed} weights {weights_name} are missing")
    net = network_cls(config)
    check_tensors(tensors, net.state_dict(), path, RouterError, config_name)
    net.load_state_dict(tensors)
    return net.to(next(model.parameters()).device).eval().requires_grad_(False)


class RoutedBase(nn.Module):
    """What every routed wrapper of a frozen base model shares: the base's ``config``, and
    ``disable_routing()`` to run the plain base model inside a ``with`` block."""

    _routing = True

    @property
    def config(self):
        return self.base.config

    @contextmanager
    def disable_routing(self):
        """Run the plain base model inside the block (``forward`` and ``generate`` call it directly)."""
        old, self._routing = self._routing, False
        try:
            yield self
        finally:
            self._routing = old


@dataclass
class SavedRouterConfig:
    """What every saved router config records besides its own shape: the base model's size and
    identity and how the routers were trained; JSON out, and ``load`` from a directory. A subclass
    sets ``config_name`` (its file), ``what`` (its name in errors) and ``kind`` (what a folder holds)."""

    config_name = CONFIG_NAME
    what, kind = "router config", "saved routers"

    num_layers: int = option(0, "decoder blocks of the base model: one router per block")
    hidden_size: int = option(0, "hidden size of the base model (the routers' input width)")
    base_model: str = option("", "name or path of the base model the routers were trained on (informational)")
    model: dict = option(None, "fingerprint of the base model (architecture, layers, hidden size)")
    weights_digest: str = option("", "layerroute.models.weights_digest of the base checkpoint; another "
                                 "checkpoint of the same shape is refused")
    training: dict = option(None, "how the routers were trained (data, labels, metrics); informational")

    def __post_init__(self):
        self.model = dict(self.model or {})
        self.training = dict(self.training or {})

    def check_sizes(self, names, limit) -> None:
        """Each of ``names`` an integer in [1, limit(name)] (None: no upper bound), else a RouterError."""
        for name in names:
            value, top = getattr(self, name), limit(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= (value if top is None
                                                                                            else top):
                raise RouterError(f"{self.what}: {name} must be an integer in [1, {'inf' if top is None else top}], "
                                  f"got {value!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, directory: str | Path):
        path = Path(directory) / cls.config_name
        data = read_json(path, RouterError, f"{directory} holds no {cls.kind}: {cls.config_name} is missing")
        return cls.from_dict(data, str(path))


@dataclass
class RouterConfig(SavedRouterConfig):
    """Everything needed to rebuild the per-sample routers and to know which base model they belong to."""

    bottleneck: int = option(128, "width of each router's hidden layer")
    windows: int = option(8, "the prompt is cut into min(windows, T) windows; logits are averaged over them")
    dropout: float = option(0.0, "dropout after the GELU while training")
    input_norm: bool = option(True, "RMS-normalise each window mean before the router (parameter-free); deep "
                                "residual streams grow large, which slows training without it")
    budget: str | None = option(None, "default compute budget at inference: a share (0.8) or a block count (24)")
    tau: float | None = option(None, "skip or repeat a block only where the router's probability for it exceeds tau, "
                                 "else execute (chosen on validation; None: the most likely action)")
    type: str = option(CONFIG_TYPE, "type key: what kind of saved object this is")
    version: int = option(CONFIG_VERSION, "format version of this config")

    def __post_init__(self):
        super().__post_init__()
        self.check_sizes(("num_layers", "hidden_size", "bottleneck", "windows"), LIMITS.get)
        if not 0 <= self.dropout < 1:
            raise RouterError(f"router config: dropout must be in [0, 1), got {self.dropout!r}")
        Budget.parse(self.budget)
        check_tau(self.tau, "router config: tau")

    @classmethod
    def from_dict(cls, data: dict, source: str = "router config") -> RouterConfig:
        """Rebuild a config; unknown keys are warned about and dropped (newer files still load)."""
        check_config_header(data, source, CONFIG_TYPE, CONFIG_VERSION, "router")
        if "tau" not in data:
            warnings.warn(f"{source} was saved before routers had a confidence threshold (tau): it keeps its old rule, "
                          f"the most likely action per block; pass --tau (e.g. 0.9) to fall back to executing a "
                          f"block when the router is unsure", stacklevel=2)
        return config_from_dict(cls, data, source)


def check_tau(tau, what: str = "--tau") -> float | None:
    """``tau`` if it is None or a number in [0, 1]; else a RouterError naming ``what``."""
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1):
        raise RouterError(f"{what} must be a number in [0, 1] (1: never skip or repeat), got {tau!r}")
    return tau


def window_means(hidden: torch.Tensor, mask: torch.Tensor, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each window of a sample's real tokens: ``([B, W, H], valid [B, W] bool)``.

    ``hidden`` is [B, T, H], ``mask`` [B, T] (1 = real token, any padding side). A sample with
    ``n`` real tokens has ``w = min(windows, n)`` non-empty windows of ``n / w`` tokens (sizes
    differ by at most one); the rest are marked invalid.
    """
    m = mask.bool()
    n = m.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    w = n.clamp(max=windows)
    index = (m.long().cumsum(1) - 1).clamp(min=0)  # position among the real tokens
    wid = (index * w) // n  # [B, T] window of each token
    assign = F.one_hot(wid.clamp(max=windows - 1), windows).to(hidden.dtype) * m[..., None]  # [B, T, W]
    counts = assign.sum(1)  # [B, W]
    sums = torch.einsum("btw,bth->bwh", assign, hidden)
    return sums / counts.clamp(min=1)[..., None], counts > 0


class RouterNetwork(nn.Module):
    """One bottleneck MLP per decoder block; see the module docstring."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        c = config
        self.routers = nn.ModuleList(
            nn.Sequential(nn.Linear(c.hidden_size, c.bottleneck), nn.GELU(), nn.Dropout(c.dropout),
                          nn.Linear(c.bottleneck, len(ACTIONS)))
            for _ in range(c.num_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def share_of(self, model: nn.Module) -> float:
        """Router parameters as a share of ``model``'s."""
        return self.num_parameters() / sum(p.numel() for p in model.parameters())

    def layer_logits(self, layer: int, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits [..., 3] of router ``layer`` from window means [..., W, H] and their validity [..., W]."""
        x = feats.float()
        if self.config.input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        z = self.routers[layer](x)  # [..., W, 3]
        v = valid.to(z.dtype)[..., None]
        return (z * v).sum(-2) / v.sum(-2).clamp(min=1)

    def forward(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, 3] from per-layer window means [B, L, W, H] and validity [B, W] (training)."""
        return torch.stack([self.layer_logits(i, feats[:, i], valid) for i in range(self.config.num_layers)], 1)


@dataclass
class Walk:
    """What a prefill walk produced: ``counts`` [B, L] passes per block, ``logits`` [B, L, 3]
    (None when forced), ``features`` [B, L, W, H] and ``valid`` [B, W] when collected."""

    counts: torch.Tensor
    logits: torch.Tensor | None
    features: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    prefill: RoutedOutput | None = None

    def chains(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(i for i, c in enumerate(row) for _ in range(c)) for row in self.counts.tolist())

    def routes(self, executor: RouteExecutor) -> list[Route]:
        return [Route(chain, executor.fingerprint) for chain in self.chains()]


def _choose(logits: torch.Tensor, used: torch.Tensor, max_blocks: int | None, last: bool,
            tau: float | None = None) -> torch.Tensor:
    """Passes [B] of one layer: with ``tau``, skip or repeat where its probability exceeds ``tau``,
    else execute; without, the most likely action; either within what the budget still pays for."""
    cost = torch.tensor([0, 1, REPEAT_PASSES], device=logits.device)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if max_blocks is not None:
        allowed = cost[None, :] <= (max_blocks - used)[:, None]
    if last:  # a route runs at least one block
        allowed[:, 0] &= used > 0
    score = logits
    if tau is not None:  # execute scores tau: a skip or repeat wins only above it (unwanted ones score -1)
        p = logits.float().softmax(-1)
        score = torch.where(p > tau, p, torch.full_like(p, -1.0))
        score[:, 1] = tau
    return cost[score.masked_fill(~allowed, float("-inf")).argmax(-1)]


@torch.no_grad()
def walk(executor: RouteExecutor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
         net: RouterNetwork | None = None, *, forced: torch.Tensor | None = None, budget=None,
         collect: bool = False, windows: int | None = None, prefill: bool = False, tau: float | None = None) -> Walk:
    """Walk the prompt through the model once, block by block, deciding each block per sample.

    With ``net``, router ``i`` decides block ``i`` from the state it reached (``budget`` caps
    the blocks, ``tau`` is its confidence threshold); with ``forced`` ([B, L] passes, e.g. a searched route), the walk follows it
    (teacher forcing). ``collect`` keeps the window means each router read. ``prefill`` keeps
    the walk's KV cache and last logits (``Walk.prefill``), so generation does not run the
    prompt again.
    """
    if (net is None) == (forced is None):
        raise RouterError("walk needs either routers (net) or forced pass counts, not both")
    L = executor.num_layers
    state = executor.begin(input_ids, attention_mask)
    mask = state.attention_mask
    B = mask.shape[0]
    W = net.config.windows if net is not None else windows
    if W is None:
        raise RouterError("walk with forced counts needs the number of windows to collect features")
    budget = Budget.parse(budget)
    max_blocks = budget.max_blocks(L) if budget is not None else None
    used = torch.zeros(B, dtype=torch.long, device=mask.device)
    cache = RouteKVCache.open(B) if prefill else None
    counts, logits, feats, valid = [], [], [], None
    for i in range(L):
        need = net is not None or collect
        if need:
            means, valid = window_means(state.hidden, mask, W)
        if net is not None:
            lg = net.layer_logits(i, means, valid)
            logits.append(lg)
            c = _choose(lg, used, max_blocks, last=i == L - 1, tau=tau)
        else:
            c = forced[:, i].to(mask.device).long()
        if collect:
            feats.append(means.float())
        counts.append(c)
        used = used + c
        chains = [(i,) * n for n in c.tolist()]
        if any(chains):
            state = executor.advance(state, chains, cache=cache)
    result = Walk(torch.stack(counts, 1).cpu(), torch.stack(logits, 1).cpu() if logits else None,
                  torch.stack(feats, 1).cpu() if collect else None, valid.cpu() if collect else None)
    if prefill:
        result.prefill = RoutedOutput(executor.finish(state, 1), None, cache.close(result.chains()))
    return result


def route_prompts(net: RouterNetwork, executor: RouteExecutor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, budget=None,
                  prefill: bool = False, tau: float | None = None) -> tuple[list[Route], Walk]:
    """One route per prompt of a left-padded batch, decided by the routers at prefill (``budget`` and
    ``tau`` default to the routers' config)."""
    result = walk(executor, input_ids, attention_mask, net,
                  budget=budget if budget is not None else net.config.budget, prefill=prefill,
                  tau=check_tau(tau) if tau is not None else net.config.tau)
    return result.routes(executor), result
