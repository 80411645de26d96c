"""The ``layerroute`` model of lm-evaluation-harness: any routing policy, scored by lm-eval.

``--model layerroute --model_args model=smollm2-135m[,route=SPEC|JSON | router=DIR | policy=DIR]``
wraps the full model (no route), a static route, trained routers or any saved policy; routers
take ``budget`` and ``tau`` as ``layerroute eval --router`` does. Other keys: ``batch_size``
(rows per forward), ``device`` (cpu, cuda, cuda:N, mps), ``dtype``, ``trust_remote_code``,
``max_length``, ``max_gen_toks``. ``model_args`` win over lm-eval's own
``--batch_size`` and ``--device``. A route spec with commas (``chain:...``) cannot sit in
``model_args``, which lm-eval splits at commas: save it as a route JSON file instead.

* ``loglikelihood``: requests are tokenized as lm-eval's ``hf`` model does; those that share a
  context (the options of a multiple-choice question) are scored in one row, the context once
  and every continuation packed behind it (``RouteExecutor.begin(segments=)``, as ``Objective``
  packs options), ``batch_size`` rows per executor call. The route is picked from the context.
* ``loglikelihood_rolling``: lm-eval's rolling windows; one route per document, picked from its
  first window (as ``RoutedModel.forward`` picks a route from the whole sequence).
* ``generate_until``: the executor's KV-cached decoding along the route picked from the prompt,
  stopping a row at EOS or once its text holds one of the ``until`` strings (then cut there),
  at most ``max_gen_toks`` new tokens.

lm-eval imports this module only when a run asks for ``--model layerroute`` (``layerroute.harness``).
"""

from __future__ import annotations

import json
import warnings

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import resolve_max_length
from tqdm.auto import tqdm

from layerroute.errors import InputError
from layerroute.executor import RouteExecutor
from layerroute.models import DEFAULT_MODEL, load_model
from layerroute.scoring import (left_pad, pack_options, packed_greedy, packed_logliks, packed_targets, packing_verdict,
                                set_packing_verdict)

from .base import StaticPolicy, load_policy

MODEL_ARGS = ("model", "route", "router", "policy", "budget", "tau", "batch_size", "max_batch_size", "device", "dtype",
              "trust_remote_code", "max_length", "max_gen_toks")
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm-eval's command line passes when --device is not given
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _positive_int(value, what: str) -> int:
    try:
        n = int(value) if not isinstance(value, bool) and str(value).strip().isdigit() else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1:
        raise InputError(f"model_args {what} must be a positive integer, got {value!r}")
    return n


class LayerRouteLM(TemplateLM):
    """lm-eval's ``layerroute`` model; see the module docstring."""

    def __init__(self, model: str = DEFAULT_MODEL, route=None, router=None, policy=None, budget=None, tau=None,
                 batch_size=8, max_batch_size=None, device: str | None = None, dtype=None,
                 trust_remote_code: bool = False, max_length=None, max_gen_toks=256, **unknown):
        super().__init__()
        if unknown:
            raise InputError(f"unknown model_args key(s) {', '.join(map(repr, sorted(unknown)))} for --model "
                             f"layerroute; use {', '.join(MODEL_ARGS)}")
        given = [k for k, v in (("route", route), ("router", router), ("policy", policy)) if v is not None]
        if len(given) > 1:
            raise InputError(f"model_args {' and '.join(given)} exclude each other; give one route, router or "
                             f"policy (none: the full model)")
        if not isinstance(trust_remote_code, bool):
            raise InputError(f"model_args trust_remote_code must be True or False, got {trust_remote_code!r}")
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.model_name = str(model)
        hf_model, self.tokenizer = load_model(self.model_name, device=str(device or "cpu"), dtype=dtype,
                                              trust_remote_code=trust_remote_code)
        self.executor = RouteExecutor(hf_model)
        self._max_length = _positive_int(max_length, "max_length") if max_length is not None else \
            resolve_max_length(hf_model.config, self.tokenizer, default=2048)
        if router is not None or policy is not None:
            import layerroute.policies.ppo_policy  # noqa: F401  (registers the "ppo" policy type)
            import layerroute.routers.routed_model  # noqa: F401  (registers the "router" policy type)

            self.policy = load_policy(str(router or policy), self.executor)
        else:
            self.policy = StaticPolicy(self.executor.route(None if route is None else str(route)))
        if budget is not None or tau is not None:  # as `layerroute eval --router DIR --budget B --tau T`
            if self.policy.type != "router":
                raise InputError(f"model_args budget and tau apply to trained routers only, not to a "
                                 f"{self.policy.type} policy")
            from layerroute.budget import Budget
            from layerroute.routers.network import check_tau

            Budget.parse(budget)
            self.policy.budget = self.policy.budget if budget is None else budget
            self.policy.tau = self.policy.tau if tau is None else check_tau(tau, "model_args tau")
        self._check_packing()

    # ---- what lm-eval reads -----------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``model_args`` win over lm-eval's ``--batch_size`` / ``--device`` (it always passes a batch
        size, and the device cuda:0 by default, which falls back to cpu without a GPU, as for its hf model)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if extra.get("device") == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
            extra["device"] = "cpu"
        return cls(**{**extra, **arg_dict})

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # as lm-eval's hf model: BOS, else EOS
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.executor.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        routing = self.policy.route.describe() if isinstance(self.policy, StaticPolicy) else self.policy.type
        return {"model": self.model_name, "routing": routing, "fingerprint": self.executor.fingerprint.to_dict()}

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """As lm-eval's ``hf`` model: the tokenizer's default special tokens, none if the text starts with BOS."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ------------------------------------------------------------------------------
    def _routes(self, inputs: list) -> list:
        """One route per token sequence (a context), picked by the policy from the left-padded batch."""
        ids, mask = left_pad([list(t) for t in inputs], self.tokenizer, self.executor.device)
        return self.policy.route_batch(self.executor, ids, mask)

    def _score_rows(self, rows: list, routes: list) -> list[list[tuple[float, bool]]]:
        """Rows ``(context tokens, [option tokens, ...])`` along ``routes``: per row and option,
        the summed log-likelihood and whether every token is the greedy one."""
        seqs, segs = zip(*(pack_options(ctx, opts) for ctx, opts in rows))
        keep = max(len(s) - s.count(0) for s in segs) + 1
        ids, mask = left_pad(list(seqs), self.tokenizer, "cpu")
        segments, pos, tgt, valid = packed_targets(ids, list(segs), keep)
        ex = self.executor
        state = ex.advance(ex.begin(ids.to(ex.device), mask.to(ex.device), segments=segments), routes)
        logp = torch.log_softmax(ex.finish(state, keep).float(), dim=-1)
        ll, greedy = packed_logliks(logp, pos, tgt, valid)[0], packed_greedy(logp, pos, tgt, valid)
        return [[(float(ll[r, k]), bool(greedy[r, k])) for k in range(len(opts))] for r, (_, opts) in enumerate(rows)]

    def _check_packing(self) -> None:
        """Options packed behind one context must score as in their own rows (as ``Objective``
        checks, once per executor); else each request gets its own row, with a warning."""
        ex = self.executor
        if packing_verdict(ex) is not None:
            return
        enc = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        ctx, opts, identity = enc("The capital of France is"), [enc(" Paris"), enc(" the city of Lyon")], [ex.route()]
        packed = [ll for ll, _ in self._score_rows([(ctx, opts)], identity)[0]]
        alone = [self._score_rows([(ctx, [o])], identity)[0][0][0] for o in opts]
        tol = 2e-3 if next(ex.model.parameters()).dtype in (torch.float32, torch.float64) else 2e-1
        set_packing_verdict(ex, all(abs(a - b) <= tol for a, b in zip(packed, alone)))
        if not packing_verdict(ex):
            warnings.warn(f"{type(ex.model).__name__}: continuations packed behind one context do not score as in "
                          f"their own rows ({packed} against {alone}); scoring each in its own row (slower)",
                          stacklevel=2)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, route_inputs=None):
        """``requests``: ``(strings, context tokens, continuation tokens)``; ``route_inputs``: the
        tokens each request's route is picked from (default: its context)."""
        L, pack = self.max_length, packing_verdict(self.executor)
        groups: dict = {}  # (context, route input[, continuation]) -> {continuation: [request indices]}
        for j, (_, ctx, cont) in enumerate(requests):
            if not 0 < len(cont) <= L:
                raise InputError(f"a continuation of {len(cont)} tokens cannot be scored within max_length {L}")
            ctx = tuple(ctx[-(L + 1 - len(cont)):])  # as lm-eval's hf: the last L tokens of context + continuation
            key = (ctx, ctx if route_inputs is None else tuple(route_inputs[j])) + (() if pack else (tuple(cont),))
            groups.setdefault(key, {}).setdefault(tuple(cont), []).append(j)
        rows = sorted(groups.items(), key=lambda kv: -(len(kv[0][0]) + sum(map(len, kv[1]))))
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="layerroute loglikelihood")
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            scores = self._score_rows([(key[0], list(opts)) for key, opts in batch],
                                      self._routes([key[1] for key, _ in batch]))
            for (_, opts), row in zip(batch, scores):
                for js, result in zip(opts.values(), row):
                    for j in js:
                        out[j] = result
                        if requests[j][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[j][0], result)
                        bar.update(1)
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner, route_inputs = [], [], []
        for i, req in enumerate(requests):
            parts = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            first = (list(parts[0][0]) + list(parts[0][1]))[:-1] if parts else []  # the first window's input
            windows += [(None, ctx, cont) for ctx, cont in parts]
            owner += [i] * len(parts)
            route_inputs += [first] * len(parts)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, route_inputs=route_inputs)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------
    def _gen_options(self, kwargs) -> tuple[list[str], int, dict]:
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise InputError(f"generation option(s) {', '.join(map(repr, unknown))} are not supported by --model "
                             f"layerroute; it takes {', '.join(GEN_KWARGS)}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until += [] if eos in until else [eos]
        max_toks = _positive_int(kwargs.get("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        if max_toks >= self.max_length:
            raise InputError(f"max_gen_toks {max_toks} leaves no room for a prompt within max_length {self.max_length}")
        sample = bool(kwargs.get("do_sample", False))  # as lm-eval's hf: greedy unless do_sample
        sampling = dict(do_sample=sample, temperature=float(kwargs.get("temperature") or 1.0) if sample else 1.0,
                        top_k=kwargs.get("top_k") if sample else None, top_p=kwargs.get("top_p") if sample else None)
        return [t for t in until if t], max_toks, sampling

    def _generate(self, prompts: list[list[int]], until: list[str], max_toks: int, sampling: dict) -> list[str]:
        ids, mask = left_pad(prompts, self.tokenizer, self.executor.device)
        width, decode = ids.shape[1], self.tokenizer.batch_decode

        def stop(seqs):
            return torch.tensor([any(t in s for t in until) for s in decode(seqs[:, width:], skip_special_tokens=True)])

        out = self.executor.generate(ids, mask, self._routes(prompts), max_new_tokens=max_toks,
                                     eos_token_id=self.eot_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                     stop=stop if until else None, **sampling)
        texts = decode(out.sequences[:, width:], skip_special_tokens=True)
        for term in until:
            texts = [s.split(term)[0] for s in texts]
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        by_options: dict = {}
        for i, req in enumerate(requests):
            by_options.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="layerroute generate_until")
        for idx in by_options.values():
            until, max_toks, sampling = self._gen_options(requests[idx[0]].args[1])
            enc = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_toks) for i in idx}
            idx = sorted(idx, key=lambda i: -len(enc[i]))
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                for i, text in zip(chunk, self._generate([enc[i] for i in chunk], until, max_toks, sampling)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out
