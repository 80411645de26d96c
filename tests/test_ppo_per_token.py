"""per_token PPO policies exported and evaluated (policies/ppo_policy.py): inside the blocks they take the
env's decisions, and `eval --policy` reports the realised executed blocks per token."""

import numpy as np
import torch

from layerroute.envs.routing_env import LayerRoutingEnv, build_core
from layerroute.evaluation import evaluate
from layerroute.models import weights_digest
from layerroute.policies import PPOPolicy, load_policy
from layerroute.policies.ppo_policy import ActorNet
from layerroute.tasks.base import Task

from .test_objective import choice_task


def per_token_policy(core, seed=0, bias=0.0):
    torch.manual_seed(seed)
    spec = core.spec
    actor = ActorNet(core.obs_dim, spec.num_layers, spec.num_actions, 16, (16,))
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(4.0)  # decisive logits: groups differ across blocks and samples
        actor.action_net.bias.add_(bias)
    ex = core.obj.executor
    return PPOPolicy(actor, core.proj, spec, ex.fingerprint, {"task": "hand"}, weights_digest(ex.model))


def env_episode(core, policy, sample):
    env = LayerRoutingEnv(core=core)
    obs, _ = env.reset(seed=0, options={"sample": sample})
    while True:
        bits = (policy.actor(torch.as_tensor(obs)[None].float()) > 0)[0].numpy().astype(np.int8)
        obs, reward, done, _, info = env.step(bits)
        if done:
            return info


def test_per_token_policy_decides_inside_the_blocks_as_the_env_does(tiny, tok, tmp_path):  # noqa: F811
    task = choice_task("letter", 11)  # letter rows are the prompts: the env's rows exactly
    core = build_core(tiny, tok, task, mode="per_token", lam=0.5, obs_dim=8, token_groups=4)
    policy = per_token_policy(core)
    policy.save(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy", tiny)
    assert loaded.spec.mode == "per_token" and loaded.token_executor is not None
    infos = [env_episode(core, loaded, i) for i in range(len(core.obj))]
    assert len({round(i["blocks"], 6) for i in infos}) > 1 and all(0 < i["blocks"] < 5 for i in infos)
    for i, ex in enumerate(core.obj.examples):
        one = evaluate(tiny, tok, Task("one", "choice", [ex], choice_scoring="letter", answer_prefix="It is"),
                       loaded, progress=False)
        assert one.per_token and abs(one.mean_blocks - infos[i]["blocks"]) < 1e-9, (i, one.mean_blocks, infos[i])
        assert one.samples[0].correct == infos[i]["correct"]
    # a batch decides as the samples alone (padding is neither observed nor counted)
    batch = evaluate(tiny, tok, Task("all", "choice", list(core.obj.examples), choice_scoring="letter",
                                     answer_prefix="It is"), loaded, batch_size=8, progress=False)
    assert [s.correct for s in batch.samples] == [i["correct"] for i in infos]


def test_per_token_policy_generates_and_routes_identity_per_sample(tiny, tok):  # noqa: F811
    from layerroute.tasks.base import Example

    core = build_core(tiny, tok, choice_task("cloze", 6), mode="per_token", lam=0.5, obs_dim=8, token_groups=4)
    policy = per_token_policy(core, seed=1)
    ids = torch.ones(3, 4, dtype=torch.long)
    assert policy.route_batch(tiny, ids, torch.ones_like(ids)) == [tiny.route()] * 3
    exs = [Example(f"g/{i}", f"What is {i} plus {i}? Think, then answer.", str(2 * i)) for i in range(4)]
    task = Task("sums", "generate", exs, max_new_tokens=5, extract="last_number")
    full = evaluate(tiny, tok, task, batch_size=2, progress=False)
    routed = evaluate(tiny, tok, task, policy, batch_size=2, progress=False)
    assert routed.per_token and 0 < routed.mean_blocks < 5
    assert [s.output for s in routed.samples] != [s.output for s in full.samples] or \
        [s.gold_nll for s in routed.samples] != [s.gold_nll for s in full.samples]
    always = per_token_policy(core, seed=1, bias=1e4)  # every group runs every block: the full model
    same = evaluate(tiny, tok, task, always, batch_size=2, progress=False)
    assert same.mean_blocks == 5 and [s.output for s in same.samples] == [s.output for s in full.samples]
