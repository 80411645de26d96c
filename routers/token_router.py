"""Per-token routers distilled from the full model (FlexiDepth style), and the routed model.

One small router per block: a bottleneck MLP (``Linear(hidden, bottleneck)``, GELU,
``Linear(bottleneck, 1)``) on the token's state entering the block, RMS-normalised without
parameters, gives the probability that the token executes the block. At inference a token
executes block ``l`` when that probability is at least ``threshold`` (0: always, the full
model), decided as the state flows: at prefill for every prompt token, and at each decoded
token for that token. The executor runs the decisions token-sparse under the chosen rule
(``kv-kept`` or ``absent``, ``layerroute.sparse``), so skipped (token, block) pairs save compute and
cached decoding is exact under that rule.

Training (``train_token_routers``) keeps the base frozen and minimises

    KL(full model's next-token distribution || routed model's) + lambda * executed share

on windows of text, with hard gates in the forward pass and straight-through (or Gumbel-sigmoid
straight-through) gradients. The training walk runs every block on every token and mixes
``h + g * (block(h) - h)``, which with hard gates is exactly the kv-kept rule (a skipped token's
K/V still come from its incoming state). The absent rule uses the same gates but is not what
they were trained under.

A token-router directory holds ``token_routers.safetensors`` (router weights only) and
``token_router_config.json`` (sizes, rule, threshold, the base model's fingerprint and weights
digest, how it was trained). Loading checks them as the per-sample routers' loader does, with
the same helpers (``layerroute.store``): the config parses, the base model has the same shape
and weights, the weights file is intact and holds exactly the expected tensors; each failure is
one ``RouterError`` line. ``train-token-router`` also keeps ``train_state.json`` and
``optimizer.safetensors`` there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from layerroute.config import option
from layerroute.errors import InputError
from layerroute.executor import RouteExecutor
from layerroute.sparse import ABSENT, KV_KEPT
from layerroute.store import atomic_save_safetensors, atomic_write, atomic_write_json, read_json, read_safetensors

from .network import (RoutedBase, RouterError, SavedRouterConfig, check_config_header, config_from_dict,
                      load_router_dir)

CONFIG_NAME = "token_router_config.json"
WEIGHTS_NAME = "token_routers.safetensors"
STATE_NAME = "train_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CONFIG_TYPE = "token_router"
CONFIG_VERSION = 1
RULES = (KV_KEPT, ABSENT)
GATES = ("straight-through", "gumbel")




@dataclass
class TokenRouterConfig(SavedRouterConfig):
    """Everything needed to rebuild the token routers and to know which base model they belong to."""

    config_name = CONFIG_NAME
    what, kind = "token router config", "token routers"

    bottleneck: int = option(64, "width of each router's hidden layer")
    init_logit: float = option(0.0, "initial bias of each router's output (0: probability 0.5 everywhere)")
    threshold: float = option(0.5, "a token executes a block when the router's probability is at least this "
                                   "(0: always)")
    rule: str = option(KV_KEPT, "what a skipped token is at the block: kv-kept (its K/V are still computed) or absent")
    type: str = option(CONFIG_TYPE, "type key: what kind of saved object this is")
    version: int = option(CONFIG_VERSION, "format version of this config")

    def __post_init__(self):
        super().__post_init__()
        self.check_sizes(("num_layers", "hidden_size", "bottleneck"), lambda name: 16384)
        check_threshold(self.threshold, "token router config: threshold")
        if self.rule not in RULES:
            raise RouterError(f"token router config: rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not isinstance(self.init_logit, (int, float)) or not math.isfinite(self.init_logit):
            raise RouterError(f"token router config: init_logit must be a finite number, got {self.init_logit!r}")

    @classmethod
    def from_dict(cls, data, source: str = "token router config") -> TokenRouterConfig:
        """Rebuild a config; unknown keys are warned about and dropped (newer files still load)."""
        check_config_header(data, source, CONFIG_TYPE, CONFIG_VERSION, "token-router")
        return config_from_dict(cls, data, source)


def check_threshold(value, what: str = "--threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise RouterError(f"{what} must be a number in [0, 1] (0: every token executes every block), got {value!r}")
    return float(value)


def rms_normalise(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = hidden.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class TokenRouterNetwork(nn.Module):
    """One gate per block; ``gate_logits(layer, hidden [..., H]) -> [...]``."""

    def __init__(self, config: TokenRouterConfig):
        super().__init__()
        self.config = config
        H, b = config.hidden_size, config.bottleneck
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(H, b), nn.GELU(), nn.Linear(b, 1))
                                   for _ in range(config.num_layers))
        with torch.no_grad():
            for g in self.gates:
                g[2].bias.fill_(config.init_logit)

    def gate_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.gates[layer](rms_normalise(hidden).to(self.gates[layer][0].weight.dtype)).squeeze(-1)

    def decide(self, layer: int, hidden: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Bool [...]: which tokens execute ``layer`` (probability >= threshold)."""
        threshold = self.config.threshold if threshold is None else threshold
        if threshold <= 0:
            return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
        return torch.sigmoid(self.gate_logits(layer, hidden)) >= threshold


class TokenDecisions:
    """The executor's ``token_mask`` callable: decides from the state entering each block and keeps
    the decisions of the last call per block (``keep[layer]`` [B, T] bool)."""

    def __init__(self, net: TokenRouterNetwork, threshold: float | None = None):
        self.net, self.threshold = net, threshold
        self.keep: dict[int, torch.Tensor] = {}
        self.executed = self.total = 0

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            keep = self.net.decide(layer, hidden, self.threshold)
        self.keep[layer] = keep
        self.executed += int(keep.sum())
        self.total += keep.numel()
        return keep

    def share(self, real: torch.Tensor | None = None) -> float:
        """Executed share of the last call's (real) tokens over all blocks."""
        if not self.keep:
            return float("nan")
        keep = torch.stack([self.keep[k] for k in sorted(self.keep)])  # [L, B, T]
        if real is None:
            return float(keep.float().mean())
        real = real[:, -keep.shape[2]:].bool().to(keep.device)
        return float((keep & real).sum()) / max(1, int(real.sum()) * keep.shape[0])


# ---- save / load ------------------------------------------------------------------------------
def save_token_routers(directory: str | Path, net: TokenRouterNetwork) -> Path:
    """Write the router weights and ``token_router_config.json`` into ``directory`` (no base weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / WEIGHTS_NAME, net.state_dict(), metadata={"format": "layerroute.token_routers"})
    atomic_write(directory / CONFIG_NAME, net.config.to_json())
    return directory


def is_token_router_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def load_token_routers(directory: str | Path, model: nn.Module) -> TokenRouterNetwork:
    """Token routers saved in ``directory``, checked against the frozen ``model``."""
    return load_router_dir(directory, model, "token router", TokenRouterConfig, TokenRouterNetwork, CONFIG_NAME,
                           WEIGHTS_NAME)


def new_token_routers(executor: RouteExecutor, *, bottleneck: int = 64, init_logit: float = 0.0,
                      threshold: float = 0.5, rule: str = KV_KEPT, base_model: str = "") -> TokenRouterNetwork:
    """Fresh token routers for ``executor``'s model, stamped with its fingerprint and weights digest."""
    from layerroute.models import weights_digest

    fp = executor.fingerprint
    config = TokenRouterConfig(num_layers=fp.num_layers, hidden_size=fp.hidden_size, bottleneck=bottleneck,
                               init_logit=init_logit, threshold=threshold, rule=rule, base_model=base_model,
                               model=fp.to_dict(), weights_digest=weights_digest(executor.model))
    return TokenRouterNetwork(config).to(executor.device)


# ---- the routed model -------------------------------------------------------------------------
@dataclass
class TokenRoutedOutput:
    """``logits`` [B, T or logits_to_keep, V]; ``executed_share`` of the real (token, block) pairs
    (None when routing is disabled); ``keep`` [B, L, T] the decisions."""

    logits: torch.Tensor
    executed_share: float | None = None
    keep: torch.Tensor | None = None

    def __getitem__(self, key):
        return getattr(self, key)


class TokenRoutedModel(RoutedBase):
    """A frozen causal LM whose token routers decide, per token and block, at prefill and at every
    decoded token; blocks run token-sparse under ``rule`` (see the module docstring)."""

    def __init__(self, base: nn.Module, routers: TokenRouterNetwork, tokenizer=None, *, rule: str | None = None,
                 threshold: float | None = None):
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.routers = routers.eval().requires_grad_(False)
        self.executor = RouteExecutor(base)
        self.tokenizer = tokenizer
        self.rule = routers.config.rule if rule is None else rule
        if self.rule not in RULES:
            raise RouterError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        self.threshold = None if threshold is None else check_threshold(threshold)
        self._routing = True
        self.last_decisions: TokenDecisions | None = None  # those of the last generate()

    @classmethod
    def from_pretrained(cls, base_model_or_path, router_dir: str | Path, *, device: str = "cpu", dtype=None,
                        rule: str | None = None, threshold: float | None = None) -> TokenRoutedModel:
        tokenizer = None
        if isinstance(base_model_or_path, (str, Path)):
            from layerroute.models import load_model

            base_model_or_path, tokenizer = load_model(str(base_model_or_path), device=device, dtype=dtype)
        return cls(base_model_or_path, load_token_routers(router_dir, base_model_or_path), tokenizer, rule=rule,
                   threshold=threshold)


    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                logits_to_keep: int = 0) -> TokenRoutedOutput:
        if not self._routing:
            return TokenRoutedOutput(self.base(input_ids=input_ids, attention_mask=attention_mask,
                                               logits_to_keep=logits_to_keep).logits)
        decide = TokenDecisions(self.routers, self.threshold)
        out = self.executor(input_ids, attention_mask, token_mask=decide, token_rule=self.rule,
                            logits_to_keep=logits_to_keep)
        keep = torch.stack([decide.keep[k] for k in sorted(decide.keep)], dim=1)
        return TokenRoutedOutput(out.logits, decide.share(attention_mask), keep)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, use_cache: bool = True, output_logits: bool = False, **kwargs):
        """``RouteExecutor.generate`` with per-token decisions at prefill and every new token.
        Returns the ``Generation`` (``sequences``, and ``logits`` with ``output_logits``);
        ``last_decisions`` then counts the (token, block) pairs it executed (``executed``, ``total``)."""
        if not self._routing:
            return self.executor.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                          use_cache=use_cache, output_logits=output_logits, **kwargs)
        self.last_decisions = TokenDecisions(self.routers, self.threshold)
        return self.executor.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, use_cache=use_cache,
                                      output_logits=output_logits, token_mask=self.last_decisions,
                                      token_rule=self.rule, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write only the token routers (safetensors) and their config; never the base model's weights."""
        return save_token_routers(directory, self.routers)


# ---- training ---------------------------------------------------------------------------------
@dataclass
class TrainTokenRouterConfig:
    """``layerroute train-token-router``: one flag per field."""

    output: str = option("runs/token_router", "directory for the token routers, their config and the training state")
    base_model: str = option("", "the base model's name (recorded in the config)")
    tasks: str = option("gen,suite,gsm8k,mmlu", "tasks whose texts (questions and answers) form the corpus")
    steps: int = option(200, "optimiser steps")
    batch_size: int = option(8, "windows per step")
    max_length: int = option(128, "tokens per window")
    lr: float = option(3e-3, "AdamW learning rate")
    lam: float = option(0.1, "weight of the executed share in the loss (>= 0; larger skips more)")
    gate: str = option("straight-through", "straight-through (hard gates, sigmoid gradient) or gumbel (noisy)")
    temperature: float = option(1.0, "Gumbel-sigmoid temperature")
    bottleneck: int = option(64, "width of each router's hidden layer")
    init_logit: float = option(0.0, "initial router bias (0: probability 0.5)")
    threshold: float = option(0.5, "inference threshold saved in the config")
    rule: str = option(KV_KEPT, "inference rule saved in the config: kv-kept or absent")
    val_windows: int = option(16, "held-out windows for the KL at start, every --eval-every steps, and end")
    eval_every: int = option(50, "steps between held-out evaluations and checkpoints")
    seed: int = option(0, "seed of the data order, the initialisation and the Gumbel noise")
    overwrite: bool = option(False, "start again even if --output holds a run")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam >= 0 \
                or not math.isfinite(self.lam):
            raise InputError(f"--lambda must be a finite number >= 0 (the weight of the executed share), got {self.lam!r}")
        for name in ("steps", "batch_size", "max_length", "val_windows", "eval_every", "bottleneck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise InputError(f"--lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise InputError(f"--temperature must be a positive number, got {self.temperature!r}")
        if self.gate not in GATES:
            raise InputError(f"--gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.rule not in RULES:
            raise InputError(f"--rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        try:
            check_threshold(self.threshold)
        except RouterError as exc:
            raise InputError(str(exc)) from None

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items() if k not in ("output", "overwrite", "progress", "steps")}


def corpus_texts(tasks: str, split: str, seed: int = 0) -> list[str]:
    """Texts of the tasks' examples in ``split``: question, then the gold answer (for choice tasks,
    the gold option's text). Everything ships with the packages; nothing is downloaded."""
    from layerroute.tasks import LETTERS, get_task

    texts = []
    for name in (t for t in tasks.split(",") if t):
        task = get_task(name).split(split, seed)
        for ex in task.examples:
            gold = ex.choices[LETTERS.index(ex.answer)] if task.kind == "choice" and ex.choices else ex.answer
            texts.append(f"{ex.question.strip()}\n{str(gold).strip()}")
    return texts


def token_windows(tokenizer, texts: list[str], max_length: int, limit: int | None = None) -> torch.Tensor:
    """The texts tokenized, joined with EOS and cut into [N, max_length] windows (no padding)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids + [eos]
        if limit is not None and len(ids) >= limit * max_length:
            break
    n = len(ids) // max_length
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise InputError(f"the corpus holds {len(ids)} tokens, fewer than one window of {max_length}")
    return torch.tensor(ids[:n * max_length]).view(n, max_length)


def soft_walk(executor: RouteExecutor, net: TokenRouterNetwork, ids: torch.Tensor, *, gate: str = "straight-through",
              temperature: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward: every block on every token, ``h + g * (block(h) - h)`` with hard gates
    ``g`` whose gradient is the sigmoid's. Returns (logits [B, T, V], executed share, differentiable)."""
    st = executor.stack
    state = executor.begin(ids)
    h = state.hidden
    shares = []
    for layer in range(executor.num_layers):
        logit = net.gate_logits(layer, h)
        if gate == "gumbel":
            u = torch.rand(logit.shape, generator=generator, device="cpu").to(logit.device).clamp(1e-6, 1 - 1e-6)
            logit = (logit + torch.log(u) - torch.log1p(-u)) / temperature
        p = torch.sigmoid(logit)
        g = (p >= 0.5).to(p.dtype) + p - p.detach()
        window, rtype = st.windows[layer], st.layer_types[layer]
        pe = state.position_embeddings.get(rtype, state.position_embeddings.get("*"))
        out = st.layers[layer](h, attention_mask=state.masks[window], position_ids=state.position_ids,
                               position_embeddings=pe, cache=None, use_cache=False)
        out = out[0] if isinstance(out, tuple) else out
        h = h + g.to(h.dtype)[..., None] * (out - h)
        shares.append(g.mean())
    return executor.head_logits(h), torch.stack(shares).mean()


def kl_from_full(full_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(full || routed) of the next-token distributions, in nats."""
    p = F.log_softmax(full_logits.float(), -1)
    q = F.log_softmax(logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean()


@torch.no_grad()
def heldout_kl(executor: RouteExecutor, net: TokenRouterNetwork, windows: torch.Tensor, *, rule: str | None = None,
               threshold: float | None = None, batch_size: int = 8) -> tuple[float, float]:
    """(mean KL from the full model, executed share) of the routers as inference runs them:
    hard decisions, token-sparse blocks under ``rule``."""
    rule = net.config.rule if rule is None else rule
    kls, shares, n = 0.0, 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(executor.device)
        full = executor(ids).logits
        decide = TokenDecisions(net, threshold)
        routed = executor(ids, token_mask=decide, token_rule=rule).logits
        kls += float(kl_from_full(full, routed)) * len(ids)
        shares += decide.share() * len(ids)
        n += len(ids)
    return kls / n, shares / n


def _save_state(directory: Path, net, opt, step: int, settings: dict, history: list) -> None:
    tensors = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_token_routers(directory, net)
    atomic_save_safetensors(directory / OPTIMIZER_NAME, tensors)
    atomic_write_json(directory / STATE_NAME, {"step": step, "settings": settings, "history": history})


def _load_state(directory: Path, opt) -> None:
    tensors = read_safetensors(directory / OPTIMIZER_NAME, RouterError,
                               f"{directory}: {OPTIMIZER_NAME} is missing; pass --overwrite to start again")
    state: dict = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _resume(out: Path, executor: RouteExecutor, config: TrainTokenRouterConfig, settings: dict, net, opt):
    """``(net, opt, start step, history)``: from the training state in ``out`` when it holds a run with the same
    settings (refused with other settings), else the fresh ``net`` and ``opt`` at step 0."""
    state_path = out / STATE_NAME
    if not state_path.is_file() or config.overwrite:
        return net, opt, 0, []
    saved = read_json(state_path, RouterError, "")
    if saved.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                      if settings.get(k) != saved.get("settings", {}).get(k))
        raise RouterError(f"{out} holds a token-router run with other settings ({', '.join(diff)}); pass "
                          f"--overwrite to start again, or another --output")
    net = load_token_routers(out, executor.model).train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    _load_state(out, opt)
    return net, opt, int(saved["step"]), list(saved.get("history", []))


def _train_step(executor: RouteExecutor, net, opt, train: torch.Tensor, step: int,
                config: TrainTokenRouterConfig) -> tuple[float, float]:
    """One optimiser step on batch ``step`` (a fresh permutation each epoch, Gumbel noise seeded by the step):
    loss = KL from the full model + lam x executed share; returns (KL, share)."""
    n = len(train)
    epoch, k = divmod(step, max(1, n // config.batch_size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
    ids = train[order[k * config.batch_size:(k + 1) * config.batch_size]].to(executor.device)
    with torch.no_grad():
        full = executor(ids).logits
    noise = torch.Generator().manual_seed(config.seed * 1000003 + step)
    logits, share = soft_walk(executor, net, ids, gate=config.gate, temperature=config.temperature, generator=noise)
    kl = kl_from_full(full, logits)
    loss = kl + config.lam * share
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(kl.detach()), float(share.detach())


def _summary(config: TrainTokenRouterConfig, train_windows: int, val_windows: int, history: list) -> dict:
    """What the config's ``training`` records: the settings and the held-out KL and share, first and last."""
    return {"steps": config.steps, "train_windows": train_windows, "val_windows": val_windows,
            "max_length": config.max_length, "tasks": config.tasks, "lam": config.lam, "gate": config.gate,
            "lr": config.lr, "heldout_kl_start": history[0]["heldout_kl"], "heldout_kl_end": history[-1]["heldout_kl"],
            "executed_share_start": history[0]["executed_share"],
            "executed_share_end": history[-1]["executed_share"], "history": history}


def train_token_routers(executor: RouteExecutor, train: torch.Tensor, val: torch.Tensor,
                        config: TrainTokenRouterConfig) -> tuple[TokenRouterNetwork, dict]:
    """Train token routers on windows ``train`` [N, T] (held-out ``val``) into ``config.output``.

    Resumes from the training state in ``config.output`` when it holds an unfinished run with the
    same settings (``--overwrite`` starts again). Returns the routers and a summary (also saved in
    the config's ``training``)."""
    from tqdm import tqdm

    config.validate()
    out = Path(config.output)
    executor.model.requires_grad_(False)  # the base stays frozen: gradients reach the routers only
    torch.manual_seed(config.seed)
    net = new_token_routers(executor, bottleneck=config.bottleneck, init_logit=config.init_logit,
                            threshold=config.threshold, rule=config.rule, base_model=config.base_model)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    settings = config.settings()
    val = val[:config.val_windows]
    net, opt, start, history = _resume(out, executor, config, settings, net, opt)
    net.train().requires_grad_(True)
    if start == 0:
        kl, share = heldout_kl(executor, net, val)
        history.append({"step": 0, "heldout_kl": kl, "executed_share": share})
    bar = tqdm(total=config.steps, initial=min(start, config.steps), desc="train-token-router", unit="step",
               disable=not config.progress)
    for step in range(start, config.steps):
        kl, share = _train_step(executor, net, opt, train, step, config)
        bar.update(1)
        bar.set_postfix(kl=f"{kl:.3f}", share=f"{share:.2f}")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            net.eval()
            vkl, vshare = heldout_kl(executor, net, val)
            net.train()
            history.append({"step": done, "heldout_kl": vkl, "executed_share": vshare,
                            "train_kl": kl, "train_share": share})
            _save_state(out, net, opt, done, settings, history)
    bar.close()
    net.eval().requires_grad_(False)
    summary = _summary(config, len(train), len(val), history)
    net.config.training = summary
    save_token_routers(out, net)
    return net, summary


def train_token_router_run(config: TrainTokenRouterConfig, load) -> dict:
    """The command: load the model, build the corpus windows (search split to train, validation
    split held out), train, and print where the routers went."""
    config.validate()
    model, tokenizer = load()
    executor = RouteExecutor(model)
    train = token_windows(tokenizer, corpus_texts(config.tasks, "search", config.seed), config.max_length)
    val = token_windows(tokenizer, corpus_texts(config.tasks, "validation", config.seed), config.max_length,
                        limit=config.val_windows)
    _, summary = train_token_routers(executor, train, val, config)
    print(f"token routers in {config.output}: held-out KL {summary['heldout_kl_start']:.4f} -> "
          f"{summary['heldout_kl_end']:.4f} nats, executed share {summary['executed_share_start']:.2f} -> "
          f"{summary['executed_share_end']:.2f} (rule {config.rule}, lambda {config.lam})")
    return summary
