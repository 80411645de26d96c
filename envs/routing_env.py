"""``LayerRoutingEnv`` (Gymnasium) and ``LayerRoutingVecEnv`` (an SB3 ``VecEnv``): routing as an MDP.

The modes, the observation, the budget and the at-least-one-block rule are defined in
``layerroute.envs.mdp`` (read its docstring). Here:

* **Data.** Episodes draw samples (with ``self.np_random``) from an ``Objective`` over the
  *search* split of the task (the first ``limit`` examples), so test examples are never seen.
* **Reward.** The objective's reward of the implied route, given once, at the end of the
  episode (``0`` before): the margin by default (or ``correct``) minus
  ``lam * blocks / L``. No shaping is applied. ``per_token`` counts blocks as executed
  (token, block) pairs over the sample's tokens. ``edit`` rewards the final route's reward minus
  the full route's (the margin gain minus ``lam * (blocks - L) / L``).
* **edit mode's caches.** Per sample, the full route is walked once: its pooled states at
  ``spec.edit_points`` (the observation), the states there, and its reward. A final route is run
  from the last of those states that its prefix shares with the full route (an edit at block 25
  of 30 runs 5 or so blocks, not 30), and each (sample, route) reward is kept, so a route seen
  again costs nothing. Memory: ``obs_points`` states of the sample's rows per sample.
* **Model.** The executor is passed in, or the embedded ``smollm2-135m`` is loaded once per
  process (and kept, on its device); with no task, the generated ``gen`` task is used (or the
  ``suite`` where ``gen`` is not registered).
* **Batched.** ``RoutingCore.step`` advances any number of episodes with one executor call
  (``PrefixState.concat``) and scores the finished ones with one ``finish``. The single env
  is the batch of one; the vectorized env is the batch of ``num_envs``, so the two agree step
  for step (same seeds: slot ``j`` of ``seed(s)`` behaves as a single env reset with ``s + j``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env import VecEnv

from layerroute.executor import RouteExecutor
from layerroute.objective import Objective, PrefixState, memoised

from .mdp import CLIP, EnvError, MDPSpec, ObsProjection, Progress, check_finite, full_route_points, observe, pool

_MODEL: dict = {}  # the embedded default, loaded once per process
DEFAULT_LIMIT = 512  # search samples of the default task


def default_model():
    """The embedded ``smollm2-135m`` executor and tokenizer, loaded once per process."""
    if not _MODEL:
        from layerroute.models import DEFAULT_MODEL, load_model

        model, tok = load_model(DEFAULT_MODEL)
        _MODEL["v"] = (RouteExecutor(model), tok)
    return _MODEL["v"]


def default_task(seed: int = 0):
    """``gen`` (the harder generated tasks) where registered, else the ``suite``."""
    from layerroute.tasks import get_task, list_tasks

    names = {t.split("[")[0].split(":")[0] for t in list_tasks()}
    return get_task("gen" if "gen" in names else "suite", seed=seed)


@memoised
def fit_projection(obj: Objective, dim: int, fit_samples: int) -> ObsProjection:
    """PCA of pooled identity-route states entering every layer (and after the last) of the first
    ``fit_samples`` samples; memoised on the objective so every env over it shares one projection."""
    samples = list(range(min(fit_samples, len(obj))))
    vectors = []
    for chunk in obj.batches(samples):
        prefix = obj.begin(chunk)
        first = _first_rows(prefix)
        mask = obj.prompt_mask()[obj.first_row[chunk]]
        for layer in range(obj.num_layers + 1):
            check_finite(prefix.state.hidden, f"entering layer {layer} of the identity route")
            vectors.append(pool(prefix.state.hidden[first], mask))
            if layer < obj.num_layers:
                prefix = obj.advance(prefix, [(layer,)] * len(chunk))
    return ObsProjection.fit(torch.cat(vectors).cpu(), dim, fit_samples=len(samples))


def _first_rows(prefix: PrefixState) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(prefix.sizes)[:-1].tolist()], device=prefix.state.hidden.device)


@dataclass
class Episode:
    sample: int
    prefix: PrefixState | None  # None in edit mode (the route runs once, at the end)
    progress: Progress


@dataclass
class FullRoute:
    """``edit`` mode, per sample: the full route's pooled states [m, H] at the spec's edit points, its
    reward and margin (its states there are in the objective's prefix cache)."""

    pooled: torch.Tensor
    reward: float
    margin: float


class RoutingCore:
    """One objective, MDP spec and projection; starts and advances any number of episodes in one call."""

    def __init__(self, objective: Objective, spec: MDPSpec, proj: ObsProjection):
        self.obj, self.spec, self.proj = objective, spec, proj
        if spec.mode == "per_token":  # the token group of every real token, -1 on padding
            real = objective.mask.bool()
            k = real.long().cumsum(1) - 1
            n = real.sum(1, keepdim=True)
            self.groups = torch.where(real, k * spec.token_groups // n, torch.full_like(k, -1))
            self.tokens = objective.tokens(range(len(objective))).float()
        self.full: dict[int, FullRoute] = {}  # edit: per sample, computed once
        self.scored: dict[tuple[int, tuple[int, ...]], tuple[float, float, bool]] = {}  # edit: route rewards

    @property
    def obs_dim(self) -> int:
        return self.spec.obs_size(self.proj.dim)

    def spaces(self):
        obs = gym.spaces.Box(-CLIP, CLIP, (self.obs_dim,), np.float32)
        n = self.spec.num_actions
        act = gym.spaces.MultiBinary(n) if self.spec.mode == "per_token" else gym.spaces.Discrete(n)
        return obs, act

    def _obs(self, prefix: PrefixState, progress) -> np.ndarray:
        mask = self.obj.prompt_mask()[self.obj.first_row[list(prefix.samples)]]
        pooled = pool(prefix.state.hidden[_first_rows(prefix)], mask)
        return observe(self.spec, self.proj, pooled, progress).numpy()

    def start(self, samples) -> tuple[list[Episode], np.ndarray]:
        """New episodes on ``samples`` (one embedding call) and their first observations."""
        if self.spec.mode == "edit":
            eps = [Episode(self.obj._check_sample(s), None, self.spec.start()) for s in samples]
            return eps, self._edit_obs(eps)
        prefix = self.obj.begin(samples)
        progress = [Progress() for _ in samples]
        eps = [Episode(s, prefix.select(j), p) for j, (s, p) in enumerate(zip(prefix.samples, progress))]
        return eps, self._obs(prefix, progress)

    def step(self, episodes: list[Episode], actions) -> tuple[list[Episode], np.ndarray, np.ndarray, np.ndarray,
                                                              list[dict]]:
        """One action per episode, one executor call for all: (episodes, obs, rewards, dones, infos)."""
        obj, spec = self.obj, self.spec
        if spec.mode == "edit":
            return self._edit_step(episodes, actions)
        prefix = PrefixState.concat([e.prefix for e in episodes])
        if spec.mode == "per_token":
            progress, done, prefix = self._token_step(episodes, actions, prefix)
        else:
            chains, progress, done = [], [], []
            for e, a in zip(episodes, actions):
                chain, p, d = spec.apply(e.progress, int(np.asarray(a).item()))
                chains.append(chain)
                progress.append(p)
                done.append(d)
            prefix = obj.advance(prefix, chains)
        check_finite(prefix.state.hidden, f"after step {episodes[0].progress.t} (mode {spec.mode}) on samples "
                                          f"{[obj.examples[e.sample].uid for e in episodes][:4]}")
        obs = self._obs(prefix, progress)
        rewards = np.zeros(len(episodes), np.float32)
        infos: list[dict] = [{} for _ in episodes]
        ended = [j for j, d in enumerate(done) if d]
        if ended:
            scores = obj.finish(PrefixState.concat([prefix.select(j) for j in ended]))
            blocks = torch.tensor([progress[j].blocks for j in ended], dtype=torch.float64)
            reward = scores.reward if spec.mode != "per_token" else \
                obj.reward_of(scores.margin, scores.correct, blocks).reward  # the objective's own formula
            self._end(episodes, progress, ended, reward.tolist(), scores.margin.tolist(), scores.correct.tolist(),
                      rewards, infos)
        new = [Episode(e.sample, prefix.select(j), p) for j, (e, p) in enumerate(zip(episodes, progress))]
        return new, obs, rewards, np.array(done, dtype=bool), infos

    def _end(self, episodes, progress, ended, reward, margin, correct, rewards, infos) -> None:
        """Rewards and infos of the episodes that ended (a non-finite reward is an error)."""
        if not all(np.isfinite(reward)):
            raise EnvError(f"non-finite reward {reward} on samples "
                           f"{[self.obj.examples[episodes[j].sample].uid for j in ended]}; refusing to train on it")
        for k, j in enumerate(ended):
            rewards[j] = reward[k]
            infos[j] = {"sample": episodes[j].sample, "route": list(progress[j].chain),
                        "blocks": float(progress[j].blocks), "margin": float(margin[k]), "correct": bool(correct[k])}
            if self.spec.mode == "edit":
                infos[j].update(edits=progress[j].t, gain=float(margin[k]) - self.full[episodes[j].sample].margin)

    # ---- edit mode -------------------------------------------------------------------------------
    def _full_routes(self, samples) -> list[FullRoute]:
        """The full route of each sample (walked once per sample, batched over the new ones)."""
        obj, L = self.obj, self.obj.num_layers
        new = list(dict.fromkeys(s for s in samples if s not in self.full))
        for chunk in obj.batches(new):
            mask = obj.prompt_mask()[obj.first_row[chunk]]
            states, pooled = full_route_points(
                self.spec.edit_points, obj.begin(chunk), lambda st, c: obj.advance(st, [c] * len(chunk)),
                lambda st: pool(st.state.hidden[_first_rows(st)], mask))
            scores = obj.finish(states[-1])  # the last point is L: the full route
            for j, s in enumerate(chunk):
                for k, st in zip(self.spec.edit_points, states):
                    obj.prefixes.put((s,), range(k), st.select(j))
                self.full[s] = FullRoute(pooled[j].cpu(), float(scores.reward[j]), float(scores.margin[j]))
                self.scored[(s, tuple(range(L)))] = (float(scores.reward[j]), float(scores.margin[j]),
                                                     bool(scores.correct[j]))
        return [self.full[s] for s in samples]

    def _edit_obs(self, episodes) -> np.ndarray:
        full = self._full_routes([e.sample for e in episodes])
        return observe(self.spec, self.proj, torch.stack([f.pooled for f in full]),
                       [e.progress for e in episodes]).numpy()

    def score_routes(self, samples, chains) -> list[tuple[float, float, bool]]:
        """(reward, margin, correct) of each (sample, route), each run from the last full-route state its
        prefix shares and kept; the objective's ``finish`` scores them, as it scores the other modes."""
        obj = self.obj
        self._full_routes(samples)
        todo = list(dict.fromkeys((s, tuple(c)) for s, c in zip(samples, chains) if (s, tuple(c)) not in self.scored))
        done = 0
        for chunk in obj.batches([s for s, _ in todo]):  # consecutive, sized by the samples' rows
            pairs, done = todo[done:done + len(chunk)], done + len(chunk)
            states, starts = zip(*(obj.prefixes.deepest((s,), c) for s, c in pairs))
            fresh = [s for (s, _), st in zip(pairs, states) if st is None]
            if fresh:
                begun = obj.begin(fresh)
                it = iter(range(len(fresh)))
                states = [st if st is not None else begun.select(next(it)) for st in states]
            prefix = obj.advance(PrefixState.concat(states), [c[k:] for (_, c), k in zip(pairs, starts)])
            scores = obj.finish(prefix)
            for j, pair in enumerate(pairs):
                self.scored[pair] = (float(scores.reward[j]), float(scores.margin[j]), bool(scores.correct[j]))
        return [self.scored[(s, tuple(c))] for s, c in zip(samples, chains)]

    def _edit_step(self, episodes, actions):
        progress, done = [], []
        for e, a in zip(episodes, actions):
            p, d = self.spec.edit(e.progress, int(np.asarray(a).item()))
            progress.append(p)
            done.append(d)
        new = [Episode(e.sample, None, p) for e, p in zip(episodes, progress)]
        obs = self._edit_obs(new)
        rewards = np.zeros(len(episodes), np.float32)
        infos: list[dict] = [{} for _ in episodes]
        ended = [j for j, d in enumerate(done) if d]
        if ended:
            samples = [episodes[j].sample for j in ended]
            scored = self.score_routes(samples, [progress[j].chain for j in ended])
            reward = [r - self.full[s].reward for (r, _, _), s in zip(scored, samples)]
            self._end(episodes, progress, ended, reward, [m for _, m, _ in scored], [c for *_, c in scored],
                      rewards, infos)
        return new, obs, rewards, np.array(done, dtype=bool), infos

    # ---- evaluation ------------------------------------------------------------------------------
    def rollout(self, samples, act) -> list[tuple[float, dict]]:
        """One episode on each of ``samples``, all advanced together, ``act(obs [N, d]) -> N actions``
        choosing for the episodes still running (e.g. a greedy policy): each episode's (reward, info)."""
        eps, obs = self.start(list(samples))
        out: list = [None] * len(eps)
        live = list(range(len(eps)))
        while live:
            actions = act(obs)
            eps, obs, rewards, dones, infos = self.step(eps, list(actions))
            keep = []
            for k, j in enumerate(live):
                if dones[k]:
                    out[j] = (float(rewards[k]), infos[k])
                else:
                    keep.append(k)
            live = [live[k] for k in keep]
            eps, obs = [eps[k] for k in keep], obs[keep]
        return out

    def _token_step(self, episodes, actions, prefix):
        """per_token: run each episode's layer on the tokens of the chosen groups (budget permitting)."""
        obj, spec = self.obj, self.spec
        rows = obj.rows_of(list(prefix.samples))
        groups = self.groups[rows]  # [R, W]
        keep = torch.ones(len(rows), obj.num_layers, groups.shape[1], dtype=torch.bool)
        chains, progress, done, r = [], [], [], 0
        for e, a in zip(episodes, actions):
            bits = torch.as_tensor(np.asarray(a, dtype=bool).reshape(-1))
            if bits.numel() != spec.token_groups:
                raise EnvError(f"per_token actions have {spec.token_groups} bits, got {bits.numel()}")
            g = groups[r:r + len(obj.rows_of([e.sample]))]
            run = torch.where(g >= 0, bits[g.clamp(min=0)], torch.zeros_like(g, dtype=torch.bool))
            eff = float(run.sum()) / float(self.tokens[e.sample])
            p, t = e.progress, e.progress.t
            if eff > spec.left(p) + 1e-9 or eff == 0:
                eff, chain = 0.0, ()
            else:
                chain = (t,)
                keep[r:r + g.shape[0], t] = run | (g < 0)
            chains += [chain] * g.shape[0]
            progress.append(Progress(t + 1, p.blocks + eff, p.chain + chain))
            done.append(t + 1 >= obj.num_layers)
            r += g.shape[0]
        # token-sparse (layerroute.sparse): skipped tokens keep their K/V but cost no attention output or MLP
        state = obj.executor.advance(prefix.state, chains, token_mask=keep, token_rule="kv-kept")
        return progress, done, PrefixState(prefix.samples, state, [p.blocks for p in progress], prefix.sizes)


def build_core(executor=None, tokenizer=None, task=None, *, objective: Objective | None = None,
               mode: str = "per_sample", reward: str = "margin", lam: float = 0.0, budget=None, limit: int | None = None,
               seed: int = 0, obs_dim: int = 16, fit_samples: int = 16, max_steps: int | None = None,
               token_groups: int = 8, max_edits: int = 4, obs_points: int = 4, batch_rows: int = 64) -> RoutingCore:
    """The shared core of both envs (see ``LayerRoutingEnv`` for the arguments)."""
    if objective is None:
        if executor is None:
            if tokenizer is not None:
                raise EnvError("a tokenizer was given without its executor; pass both or neither")
            executor, tokenizer = default_model()
        elif tokenizer is None:
            raise EnvError("an executor was given without its tokenizer; pass both")
        if task is None:
            task, limit = default_task(seed), DEFAULT_LIMIT if limit is None else limit
        objective = Objective.from_task(executor, tokenizer, task, "search", limit, seed, reward=reward, lam=lam,
                                        budget=budget, batch_rows=batch_rows)
    spec = MDPSpec(mode, objective.num_layers, objective.max_blocks, max_steps, token_groups, max_edits, obs_points)
    return RoutingCore(objective, spec, fit_projection(objective, obs_dim, fit_samples))


class LayerRoutingEnv(gym.Env):
    """Route one search-split sample per episode (modes and rules: ``layerroute.envs.mdp``).

    Arguments: ``executor``/``tokenizer`` (default: the embedded SmolLM2-135M, loaded once),
    ``task`` (default ``gen``, else ``suite``), or a prepared search-split ``objective``;
    ``mode`` (``per_sample``, ``cola``, ``per_token``, ``edit``), ``reward`` (``margin``/``correct``), ``lam``
    (compute penalty), ``budget`` (hard, a share or a block count), ``limit`` (search samples),
    ``seed`` (of the split; the default task uses 512 samples), ``obs_dim`` / ``fit_samples`` (the
    projection), ``max_steps`` (cola), ``token_groups`` (per_token), ``max_edits`` / ``obs_points``
    (edit), ``batch_rows``. ``reset(options={"sample": i})`` starts on sample ``i``.
    """

    metadata = {"render_modes": []}

    def __init__(self, executor: RouteExecutor | None = None, tokenizer=None, task=None, **kwargs):
        self.core = kwargs.pop("core", None) or build_core(executor, tokenizer, task, **kwargs)
        self.observation_space, self.action_space = self.core.spaces()
        self._episode: Episode | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        sample = int(self.np_random.integers(len(self.core.obj)))  # drawn always, so the stream stays aligned
        if options and "sample" in options:  # evaluation: start on a given sample
            sample = self.core.obj._check_sample(options["sample"])
        (self._episode,), obs = self.core.start([sample])
        return obs[0], {"sample": sample}

    def step(self, action):
        if self._episode is None:
            raise EnvError("call reset() before step(), and again after an episode ends")
        (ep,), obs, rewards, dones, infos = self.core.step([self._episode], [action])
        self._episode = None if dones[0] else ep
        return obs[0], float(rewards[0]), bool(dones[0]), False, infos[0]


class LayerRoutingVecEnv(VecEnv):
    """``num_envs`` episodes advanced together: one batched executor call per ``step``.

    Takes ``LayerRoutingEnv``'s arguments (or ``core=``, to share one objective and projection).
    Finished episodes reset automatically (SB3's convention: the final observation is in
    ``infos[j]["terminal_observation"]``).
    """

    render_mode = None

    def __init__(self, num_envs: int = 16, executor: RouteExecutor | None = None, tokenizer=None, task=None,
                 **kwargs):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise EnvError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.core = kwargs.pop("core", None) or build_core(executor, tokenizer, task, **kwargs)
        obs_space, act_space = self.core.spaces()
        super().__init__(num_envs, obs_space, act_space)
        self._rngs = [None] * num_envs
        self._episodes: list[Episode] | None = None
        self._actions = None

    def _draw(self, j: int) -> int:
        if self._rngs[j] is None:
            self._rngs[j], _ = seeding.np_random(None)
        return int(self._rngs[j].integers(len(self.core.obj)))

    def reset(self):
        for j, s in enumerate(self._seeds):
            if s is not None:
                self._rngs[j], _ = seeding.np_random(s)
        self._reset_seeds()
        self._reset_options()
        self._episodes, obs = self.core.start([self._draw(j) for j in range(self.num_envs)])
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        if self._episodes is None:
            raise EnvError("call reset() before step()")
        eps, obs, rewards, dones, infos = self.core.step(self._episodes, list(self._actions))
        ended = np.flatnonzero(dones).tolist()
        for j in ended:
            infos[j]["terminal_observation"] = obs[j].copy()
            infos[j]["TimeLimit.truncated"] = False
        if ended:
            fresh, fresh_obs = self.core.start([self._draw(j) for j in ended])
            for k, j in enumerate(ended):
                eps[j], obs[j] = fresh[k], fresh_obs[k]
        self._episodes = eps
        return obs, rewards, dones, infos

    def close(self) -> None:
        self._episodes = None

    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        raise EnvError("LayerRoutingVecEnv holds no sub-environments to call methods on")

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(self._indices(indices))

    def _indices(self, indices):
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)
