"""PPO routing policies with stable-baselines3, used as it is: a features extractor through
``policy_kwargs``, callbacks for the learning curve and checkpoints, TensorBoard logging.

``train_ppo`` trains on a ``LayerRoutingVecEnv`` (search split only), resumes from the latest
SB3 checkpoint in the output directory, writes the learning curve to the run's results store
as it goes, and exports the greedy policy as ``policy/`` (``PPOPolicy``: safetensors + JSON).
SB3's own zips are for resuming training only: their loader unpickles, so users and
``layerroute eval --policy`` load the exported policy instead. ``ValidationCallback`` (an SB3
callback) scores the greedy policy on held-out samples as it trains (a validation learning curve).

Output directory::

    results.jsonl        the store: header (settings), one "curve" record per rollout, a "summary"
    checkpoints/*.zip    SB3 checkpoints (resume only)
    tb/                  TensorBoard logs
    policy/              the exported policy (policy_config.json + policy.safetensors)
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecMonitor

from layerroute.envs.mdp import MDPSpec
from layerroute.models import weights_digest
from layerroute.store import ResultsStore

from .ppo_policy import ActorNet, PPOPolicy, RouteEncoder

PREFIX = "ppo"


class RouteFeaturesExtractor(BaseFeaturesExtractor):
    """SB3 features extractor around ``RouteEncoder`` (the layer index as a one-hot feature)."""

    def __init__(self, observation_space, num_layers: int, features_dim: int = 64):
        super().__init__(observation_space, features_dim)
        self.encoder = RouteEncoder(observation_space.shape[0], num_layers, features_dim)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.encoder(observations)


class CurveCallback(BaseCallback):
    """After each rollout, appends the mean reward (and blocks) of the episodes it finished to the
    store (a "curve" record) and to TensorBoard."""

    def __init__(self, store: ResultsStore, start: float):
        super().__init__()
        self.store, self.start, self.rewards, self.blocks = store, start, [], []

    def _on_step(self) -> bool:
        for info, done, r in zip(self.locals["infos"], self.locals["dones"], self.locals["rewards"]):
            if done:
                self.rewards.append(float(r))
                self.blocks.append(float(info.get("blocks", np.nan)))
        return True

    def _on_rollout_end(self) -> None:
        if not self.rewards:
            return
        rec = {"type": "curve", "key": f"step:{self.num_timesteps}", "timesteps": int(self.num_timesteps),
               "episodes": len(self.rewards), "mean_reward": float(np.mean(self.rewards)),
               "mean_blocks": float(np.nanmean(self.blocks)), "wall_s": round(time.perf_counter() - self.start, 2)}
        if rec["key"] not in self.store.done():
            self.store.append(rec)
        self.logger.record("routing/mean_reward", rec["mean_reward"])
        self.logger.record("routing/mean_blocks", rec["mean_blocks"])
        self.rewards, self.blocks = [], []


class ValidationCallback(BaseCallback):
    """Before training, every ``every`` environment steps (at the first rollout start past it, so after
    the update on those steps) and at the end: one greedy episode of the
    policy on every sample of ``core`` (say a validation-split core that shares the training core's
    projection, ``RoutingCore(objective, spec, proj)``), appended to ``store`` as a "validation"
    record (each sample's reward, and the means of reward, blocks, margin, accuracy; ``edit`` mode:
    gain and edits) and logged to TensorBoard; ``log`` (e.g. ``print``) gets a one-line summary."""

    def __init__(self, core, store: ResultsStore, every: int, log=None):
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.core, self.store, self.every, self.log = core, store, every, log
        self.next, self.start = 0, time.perf_counter()

    def _on_training_start(self) -> None:
        self._evaluate()

    def _on_rollout_start(self) -> None:  # after the update on the previous rollout: the current policy
        if self.num_timesteps >= self.next:
            self._evaluate()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self._evaluate()

    def _evaluate(self) -> None:
        n = int(self.num_timesteps)
        self.next = (n // self.every + 1) * self.every
        key = f"validation:{n}"
        if key in self.store.done():
            return
        episodes = self.core.rollout(range(len(self.core.obj)), lambda o: self.model.predict(o, deterministic=True)[0])
        infos = [i for _, i in episodes]
        rec = {"type": "validation", "key": key, "timesteps": n, "samples": len(episodes),
               "mean_reward": float(np.mean([r for r, _ in episodes])),
               **{f"mean_{k}": float(np.mean([i[k] for i in infos])) for k in ("blocks", "margin", "gain", "edits")
                  if k in infos[0]},
               "accuracy": float(np.mean([i["correct"] for i in infos])),
               "rewards": [round(r, 6) for r, _ in episodes], "wall_s": round(time.perf_counter() - self.start, 2)}
        self.store.append(rec)
        if self.log is not None:
            self.log(f"validation at {n} steps: mean reward {rec['mean_reward']:+.4f}, {rec['mean_blocks']:.2f} "
                     f"blocks, accuracy {rec['accuracy']:.3f} ({rec['samples']} samples, {rec['wall_s']:.0f} s)")
        for k in ("mean_reward", "mean_blocks", "accuracy"):
            self.logger.record(f"validation/{k}", rec[k])


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The SB3 zip in ``directory/checkpoints`` with the most timesteps, or None."""
    found = [(int(m.group(1)), p) for p in Path(directory, "checkpoints").glob(f"{PREFIX}_*_steps.zip")
             if (m := re.fullmatch(rf"{PREFIX}_(\d+)_steps\.zip", p.name))]
    return max(found)[1] if found else None


def export_policy(model: PPO, spec: MDPSpec, core, directory: str | Path, meta: dict | None = None) -> PPOPolicy:
    """Copy the SB3 actor into an ``ActorNet`` and save it as a ``PPOPolicy`` (safetensors + JSON)."""
    pol = model.policy
    enc = pol.features_extractor.encoder
    pi = [m.out_features for m in pol.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    actor = ActorNet(core.obs_dim, spec.num_layers, spec.num_actions, enc.net[0].out_features, tuple(pi))
    actor.features.load_state_dict(enc.state_dict())
    actor.policy_net.load_state_dict(pol.mlp_extractor.policy_net.state_dict())
    actor.action_net.load_state_dict(pol.action_net.state_dict())
    ex = core.obj.executor
    policy = PPOPolicy(actor.cpu(), core.proj, spec, ex.fingerprint, meta, weights_digest(ex.model))
    policy.save(directory)
    return policy


def train_ppo(venv, store: ResultsStore, timesteps: int, *, seed: int = 0, device: str = "cpu", n_steps: int = 64,
              batch_size: int = 256, n_epochs: int = 4, learning_rate: float = 3e-4, ent_coef: float = 0.01,
              gamma: float = 1.0, features_dim: int = 64, pi: tuple[int, ...] = (64,), checkpoint_every: int = 4096,
              progress: bool = True, tensorboard: bool = True, resume: bool = True,
              callbacks: tuple[BaseCallback, ...] = (), task: dict | None = None) -> tuple[PPO, PPOPolicy | None]:
    """Train (or resume) PPO on ``venv`` up to ``timesteps`` environment steps; export the policy.

    The run directory is the store's. Reward arrives at the end of an episode, so ``gamma``
    defaults to 1. ``callbacks`` run beside the curve and checkpoint ones (e.g. a
    ``ValidationCallback``). ``task``: how the task was read (``layerroute.args.task_record``), kept in
    the policy so ``eval --policy`` needs no ``--task``. Returns the SB3 model and the exported
    ``PPOPolicy`` (a ``per_token`` one decides inside the blocks: ``PPOPolicy.token_executor``).
    """
    out = store.path.parent
    core = venv.core
    env = VecMonitor(venv)
    tb = str(out / "tb") if tensorboard else None
    last = latest_checkpoint(out) if resume else None
    if last is not None:
        model = PPO.load(last, env=env, device=device, tensorboard_log=tb)
        print(f"resuming from {last} ({model.num_timesteps} steps)")
    else:
        kwargs = dict(features_extractor_class=RouteFeaturesExtractor,
                      features_extractor_kwargs=dict(num_layers=core.spec.num_layers, features_dim=features_dim),
                      net_arch=dict(pi=list(pi), vf=list(pi)), activation_fn=torch.nn.Tanh)
        model = PPO("MlpPolicy", env, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
                    learning_rate=learning_rate, ent_coef=ent_coef, gamma=gamma, seed=seed, device=device,
                    policy_kwargs=kwargs, tensorboard_log=tb, verbose=0)
    start = time.perf_counter()
    remaining = timesteps - model.num_timesteps
    if remaining > 0:
        every = max(checkpoint_every // venv.num_envs, 1)
        callbacks = [CurveCallback(store, start),
                     CheckpointCallback(every, str(out / "checkpoints"), name_prefix=PREFIX), *callbacks]
        model.learn(remaining, callback=callbacks, progress_bar=progress, reset_num_timesteps=last is None,
                    tb_log_name="ppo")
        model.save(out / "checkpoints" / f"{PREFIX}_{model.num_timesteps}_steps.zip")
    wall = time.perf_counter() - start
    meta = {"timesteps": int(model.num_timesteps), "task": core.obj.task.name, "reward": core.obj.reward_kind,
            "lam": core.obj.lam, "split": "search", "samples": len(core.obj), "seed": seed, **(task or {})}
    policy = export_policy(model, core.spec, core, out / "policy", meta)
    store.append({"type": "summary", **meta, "wall_s_this_run": round(wall, 2),
                  "policy": str(out / "policy")})
    return model, policy
