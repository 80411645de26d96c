"""The routing environments: Gymnasium's checker in every mode, rewards equal the objective's score of
the implied route, the vectorized env equals single envs step for step, budgets, bounds, NaN guards."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from layerroute import RouteExecutor
from layerroute.envs import ENV_ID
from layerroute.envs.mdp import EnvError
from layerroute.envs.routing_env import LayerRoutingEnv, LayerRoutingVecEnv, build_core

from .conftest import tiny_model
from layerroute.scoring import task_prompts

from .test_objective import choice_task, ref_logprobs

L = 5  # blocks of the tiny model
MODES = ["per_sample", "cola", "per_token"]


@pytest.fixture(scope="module")
def task():
    return choice_task("cloze", 11)


def make_env(tiny, tok, task, **kw):  # noqa: F811
    return LayerRoutingEnv(tiny, tok, task, **{"obs_dim": 8, **kw})


def run(env, actions, seed=0):
    obs, _ = env.reset(seed=seed)
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        if terminated:
            return reward, info, env
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("mode", MODES)
def test_check_env_passes_in_every_mode(tiny, tok, task, mode):  # noqa: F811
    env = make_env(tiny, tok, task, mode=mode, lam=0.5)
    check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (10,)


def test_registered_with_gymnasium(tiny, tok, task):  # noqa: F811
    env = gym.make(ENV_ID, executor=tiny, tokenizer=tok, task=task, obs_dim=8, mode="cola")
    assert env.spec.id == ENV_ID and env.action_space.n == L + 1
    obs, _ = env.reset(seed=1)
    assert obs.dtype == np.float32


@pytest.mark.slow
def test_make_without_arguments_uses_the_embedded_model():
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and env.unwrapped.core.obj.num_layers == 30
    assert env.unwrapped.core.obj.task.name in ("gen", "suite")


@pytest.mark.parametrize("actions, chain", [
    ([1, 0, 2, 1, 0], (0, 2, 2, 3)),
    ([2, 2, 2, 2, 2], (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)),
    ([0, 0, 0, 0, 0], (4,)),  # a route runs at least one block: the last
])
def test_per_sample_reward_equals_the_objective_score_of_the_route(tiny, tok, task, actions, chain):  # noqa: F811
    env = make_env(tiny, tok, task, lam=0.7)
    reward, info, _ = run(env, actions)
    obj = env.core.obj
    want = obj.score([info["sample"]], [chain])
    assert tuple(info["route"]) == chain and info["blocks"] == len(chain)
    assert reward == pytest.approx(float(want.reward[0]), abs=1e-4)
    assert reward == pytest.approx(float(want.margin[0]) - 0.7 * len(chain) / L, abs=1e-4)


def test_cola_reward_equals_hand_computation_and_stop(tiny, tok, task):  # noqa: F811
    env = make_env(tiny, tok, task, mode="cola", lam=0.3)
    reward, info, _ = run(env, [3, 1, 1, L])
    want = env.core.obj.score([info["sample"]], [(3, 1, 1)])
    assert tuple(info["route"]) == (3, 1, 1)
    assert reward == pytest.approx(float(want.reward[0]), abs=1e-4)
    reward, info, _ = run(env, [L])  # a stop before any block runs the last block
    assert tuple(info["route"]) == (L - 1,)


def test_per_token_all_or_no_tokens_equal_executing_or_skipping_layers(tiny, tok, task):  # noqa: F811
    env = make_env(tiny, tok, task, mode="per_token", lam=0.5, token_groups=4)
    obj = env.core.obj
    ones, zeros = np.ones(4, np.int8), np.zeros(4, np.int8)
    reward, info, _ = run(env, [ones, zeros, ones, zeros, ones])
    want = obj.score([info["sample"]], [(0, 2, 4)])
    assert info["blocks"] == pytest.approx(3.0) and tuple(info["route"]) == (0, 2, 4)
    assert reward == pytest.approx(float(want.reward[0]), abs=1e-4)
    # half the groups: compute is the executed (token, block) pairs over the sample's tokens. The
    # reference: the cloze row holds the prompt, then every option; its first half of tokens (groups
    # 0, 1) run every block, the rest pass through. Each option is scored on its own unpadded row
    # with that token mask, by a log-softmax sum written here.
    half = np.array([1, 1, 0, 0], np.int8)
    reward, info, _ = run(env, [half] * L)
    ex = obj.examples[info["sample"]]  # the objective's examples: the task's search split
    prompt = task_prompts(tok, task, [ex])[0]
    p = tok(prompt, add_special_tokens=False).input_ids
    conts = [tok(prompt + " " + c, add_special_tokens=False).input_ids[len(p):] for c in ex.choices]
    n = len(p) + sum(len(c) for c in conts)  # the packed row's tokens
    runs = [k * 4 // n < 2 for k in range(n)]  # token k of the packed row is in group k * 4 // n
    lls, start = [], len(p)
    for c in conts:
        cols = list(range(len(p))) + list(range(start, start + len(c)))  # this option's tokens in the packed row
        keep = torch.tensor([runs[k] for k in cols])[None, None].expand(1, L, -1)
        lp = ref_logprobs(tiny, p + c, None, token_mask=keep)
        lls.append(float(sum(lp[len(p) + m - 1, t] for m, t in enumerate(c))))
        start += len(c)
    g = "ABCD".index(ex.answer)
    margin = lls[g] - max(x for j, x in enumerate(lls) if j != g)
    blocks = L * sum(runs) / n
    assert 0 < blocks < L and info["blocks"] == pytest.approx(blocks)
    assert info["margin"] == pytest.approx(margin, abs=1e-4)
    assert reward == pytest.approx(margin - 0.5 * blocks / L, abs=1e-4)


def test_hard_budget_forces_skips_and_never_breaks_it(tiny, tok, task):  # noqa: F811
    env = make_env(tiny, tok, task, budget=3, lam=0.1)
    reward, info, _ = run(env, [2, 2, 2, 2, 2])
    assert tuple(info["route"]) == (0, 0, 1) and np.isfinite(reward)
    cola = make_env(tiny, tok, task, mode="cola", budget=2)
    _, info, _ = run(cola, [0] * 10)
    assert tuple(info["route"]) == (0, 0)
    tok_env = make_env(tiny, tok, task, mode="per_token", budget=2, token_groups=2)
    _, info, _ = run(tok_env, [np.ones(2, np.int8)] * L)
    assert info["blocks"] <= 2 and tuple(info["route"]) == (0, 1)


def test_cola_episode_length_is_bounded(tiny, tok, task):  # noqa: F811
    for max_steps, want in ((None, 2 * L), (3, 3)):
        env = make_env(tiny, tok, task, mode="cola", max_steps=max_steps)
        env.reset(seed=0)
        for step in range(1, 100):
            *_, terminated, _, info = env.step(2)
            if terminated:
                break
        assert step == want and len(info["route"]) == want
    with pytest.raises(EnvError, match="max_steps"):
        make_env(tiny, tok, task, mode="cola", max_steps=0)


@pytest.mark.parametrize("mode", MODES + ["edit"])
def test_vec_env_equals_single_envs_step_for_step(tiny, tok, task, mode):  # noqa: F811
    n, seed = 3, 11
    core = build_core(tiny, tok, task, mode=mode, lam=0.4, obs_dim=8, token_groups=4)
    singles = [LayerRoutingEnv(core=core) for _ in range(n)]
    vec = LayerRoutingVecEnv(n, core=core)
    vec.seed(seed)
    obs_v = vec.reset()
    obs_s = np.stack([env.reset(seed=seed + j)[0] for j, env in enumerate(singles)])
    np.testing.assert_allclose(obs_v, obs_s, atol=1e-4)
    rng = np.random.default_rng(0)
    finished = 0
    for _ in range(13):
        actions = np.stack([vec.action_space.sample() for _ in range(n)]) if mode == "per_token" else \
            rng.integers(0, vec.action_space.n, n)
        if mode == "cola":
            actions = np.where(rng.random(n) < 0.3, L, actions)
        obs_v, rew_v, done_v, info_v = vec.step(actions)
        for j, env in enumerate(singles):
            o, r, term, trunc, info = env.step(actions[j])
            assert bool(done_v[j]) == term and not trunc
            assert rew_v[j] == pytest.approx(r, abs=1e-4)
            if term:
                finished += 1
                assert info["route"] == info_v[j]["route"]
                np.testing.assert_allclose(info_v[j]["terminal_observation"], o, atol=1e-4)
                o, _ = env.reset()
            np.testing.assert_allclose(obs_v[j], o, atol=1e-4)
    assert finished >= n  # auto-resets were exercised


def test_edit_env_passes_check_env_and_its_episodes_respect_k(tiny, tok, task):  # noqa: F811
    env = make_env(tiny, tok, task, mode="edit", lam=0.5, obs_points=2)
    check_env(env, skip_render_check=True)
    assert env.core.spec.edit_points == (2, 5)
    # 2 full-route states (after blocks 2 and 5) of 8 components, passes - 1 per block, edits, blocks
    assert env.action_space.n == 2 * L + 1 and env.observation_space.shape == (2 * 8 + L + 2,)
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        env = make_env(tiny, tok, task, mode="edit", max_edits=k, obs_points=2)
        for episode in range(4):
            obs, _ = env.reset(seed=episode)
            assert obs[-L - 2:].tolist() == [0.0] * (L + 1) + [1.0]  # the full route, no edit yet
            for step in range(1, 20):  # valid edits only: repeats of present blocks
                *_, terminated, truncated, info = env.step(L + int(rng.integers(L)))
                assert not truncated
                if terminated:
                    break
            assert step == k and info["edits"] == k and len(info["route"]) == L + k
            assert info["route"] == sorted(info["route"]) and set(info["route"]) == set(range(L))


@pytest.mark.parametrize("actions, chain", [
    ([3, L + 1, 4, 2 * L], (0, 1, 1, 2)),  # skip 3, repeat 1, skip 4, stop: the first edit is at block 1
    ([L + 4], (0, 1, 2, 3, 4, 4)),  # repeat the last block (K = 1 ends it): run on from the full route's end
    ([4, 2 * L], (0, 1, 2, 3)),  # skip the last block: run on from the state after block 2 (an observed point)
])
def test_edit_reward_is_the_margin_gain_over_the_full_route_minus_the_compute_term(tiny, tok, task, actions,
                                                                                  chain):  # noqa: F811
    lam, k = 0.7, 3 if len(actions) > 1 else 1
    env = make_env(tiny, tok, task, mode="edit", lam=lam, max_edits=k, obs_points=2)
    reward, info, _ = run(env, actions, seed=3)
    assert tuple(info["route"]) == chain and info["blocks"] == len(chain)
    # independent: a fresh objective (no cached states) scores both routes from the embeddings
    from layerroute.objective import Objective

    fresh = Objective(tiny, tok, task, env.core.obj.examples)
    got = fresh.score([info["sample"]] * 2, [chain, tuple(range(L))])
    gain = float(got.margin[0] - got.margin[1])
    assert info["margin"] == pytest.approx(float(got.margin[0]), abs=1e-4)
    assert reward == pytest.approx(gain - lam * (len(chain) - L) / L, abs=1e-4)
    again, info2, _ = run(env, actions, seed=3)  # the second time from the reward cache: the same
    assert again == reward and info2 == info


def test_edit_invalid_edits_stop_on_the_route_as_it_is(tiny, tok, task):  # noqa: F811
    env = make_env(tiny, tok, task, mode="edit", max_edits=10, obs_points=2)
    for actions, chain, edits in (([2, 2], (0, 1, 3, 4), 1),  # block 2 has no pass left to skip
                                  ([2, L + 2], (0, 1, 3, 4), 1),  # nor to repeat
                                  ([0, 1, 2, 3, 4], (4,), 4),  # a skip that would leave no block
                                  ([2 * L], tuple(range(L)), 0)):  # stop at once: the full route, reward 0
        reward, info, _ = run(env, actions)
        assert (tuple(info["route"]), info["edits"]) == (chain, edits)
        if not edits:
            assert reward == 0.0


def test_edit_settings_are_clear_errors(tiny, tok, task):  # noqa: F811
    for k in (0, -1, 1.5, True):
        with pytest.raises(EnvError, match="max_edits must be an integer of at least 1"):
            make_env(tiny, tok, task, mode="edit", max_edits=k)
    with pytest.raises(EnvError, match="obs_points"):
        make_env(tiny, tok, task, mode="edit", obs_points=L + 1)
    with pytest.raises(EnvError, match="no hard budget"):
        make_env(tiny, tok, task, mode="edit", budget=4)


def test_non_finite_hidden_state_or_reward_raises(tok, task):  # noqa: F811
    model = tiny_model("llama", vocab_size=len(tok))
    ex = RouteExecutor(model)
    env = make_env(ex, tok, task)
    env.reset(seed=0)
    env.step(1)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(EnvError, match="non-finite hidden state"):
        env.step(1)
    model = tiny_model("llama", vocab_size=len(tok))
    env = make_env(RouteExecutor(model), tok, task)
    with torch.no_grad():
        model.lm_head.weight[:, :7].fill_(float("nan"))
    with pytest.raises(EnvError, match="non-finite reward"):
        run(env, [1] * L)
    bad = tiny_model("llama", vocab_size=len(tok))
    ex = RouteExecutor(bad)  # poisoned after the executor's own checks
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(EnvError, match="non-finite"):  # the projection is never fitted on NaN either
        make_env(ex, tok, task)


def test_bad_settings_are_clear_errors(tiny, tok, task):  # noqa: F811
    with pytest.raises(EnvError, match="unknown mode"):
        make_env(tiny, tok, task, mode="tokens")
    with pytest.raises(EnvError, match="tokenizer"):
        LayerRoutingEnv(tiny, None, task)
    with pytest.raises(EnvError, match="obs_dim"):
        make_env(tiny, tok, task, obs_dim=10_000)
    with pytest.raises(EnvError, match="reset"):
        make_env(tiny, tok, task).step(0)
