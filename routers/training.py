"""Distil searched routes into routers: labels from results stores, teacher forcing, on-policy refinement.

**Labels.** A results store of a per-sample searcher (MCTS) holds one record per sample with
``"key"`` (the example uid) and its best route (``"layers"``, or ``"route"`` with layers). A
store whose records are not per sample (Optuna, a baseline, random search) contributes its
summary ``"route"`` to every example of its split (the first ``--limit`` of them). A route
becomes per-layer labels with ``Route.actions()`` (skip / execute / repeat; a block run three
times counts as repeat); routes that reorder blocks have no per-layer form and are skipped.

**Robust labels** (the default). A per-sample record of an oracle search (MCTS) keeps its best
route as a label only when the route's margin gain over the full route exceeds what chance
explains: the threshold is measured on the same search run against null labels (``search ...
--null``), the store ``DIR-null`` beside ``DIR`` or those given as ``null``; other samples are
labelled with the full route (``layerroute.search.labels``). ``robust=False`` learns every
searched route as it is. A store searched with ``--null`` is never used as labels.

**Splits.** Samples from stores searched on the ``validation`` split are the validation set
(early stopping); all others train. If no store covers the validation split, a seeded
``val_share`` (20%) of the training samples is held out instead.

**Inputs (teacher forcing).** Each router ``i`` learns from the window means of the state
entering block ``i`` along the *searched* route of that sample, over the prompt only,
computed in batches with the same walk that routes at inference (``network.walk``).

**Loss and optimiser.** Focal loss (gamma 2) weighted per class by the effective number of the
label counts actually loaded (beta 0.999); AdamW (lr 1e-3, weight decay 0.01), a linear warm-up
then cosine decay, mini-batches of samples (every layer of a sample in one step). Only router
parameters train; the base model stays frozen. The best epoch by validation loss is kept.

**On-policy refinement** (DAgger-style): the routers then walk the training prompts on their
own, and the states they reach are added to the data, labelled with the searched route's
action at that layer; training continues briefly. Whether it helps is measured on the
validation prompts by on-policy agreement (the routers' own walk against the labels) and
kept only if it does not lower it; both numbers go into the saved config's ``training``.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerroute.args import task_options
from layerroute.errors import RouteError
from layerroute.executor import RouteExecutor
from layerroute.scoring import encode_texts, left_pad, task_prompts
from layerroute.store import read_store

from .network import RouterConfig, RouterError, RouterNetwork, walk

NUM_ACTIONS = 3


@dataclass
class Labels:
    """Searched routes of one task: ``search`` and ``validation`` maps of uid -> block chain."""

    task_spec: str
    task_options: dict
    seed: int
    search: dict[str, tuple[int, ...]]
    validation: dict[str, tuple[int, ...]]
    skipped: int = 0  # reordered routes, which have no per-layer labels
    threshold: float | None = None  # the robust filter's margin gain threshold (None: no filter applied)
    kept: int = 0  # samples whose searched route passed the robust filter
    filtered: int = 0  # samples the robust filter labelled with the full route instead

    def task(self):
        from layerroute.tasks import get_task

        return get_task(self.task_spec, **self.task_options)


def _record_layers(record: dict):
    if isinstance(record.get("layers"), list):
        return record["layers"]
    route = record.get("route")
    if isinstance(route, dict) and isinstance(route.get("layers"), list):
        return route["layers"]
    return None


def _robust_filter(path, header: dict, null) -> float | None:
    """The robust threshold for the per-sample records of the store at ``path`` (from ``null`` stores,
    or its ``DIR-null`` twin)."""
    from layerroute.search.labels import LabelError, check_pair, null_store_for, null_threshold

    nulls = list(null) if null else [null_store_for(path)] if null_store_for(path) else []
    if not nulls:
        raise LabelError(f"{path}: robust labels need the same search against null labels, to tell a route's gain "
                         f"from chance; run it with --null --output {Path(path)}-null (or give it with "
                         f"--null-labels), or pass --no-filter to learn every searched route as it is")
    records = []
    for n in nulls:
        null_header, null_records = read_store(n)
        check_pair(header, null_header, path, n)
        records += [r for r in null_records if isinstance(r, dict) and "identity" in r and "layers" in r]
    return null_threshold(records)


def load_labels(stores, fingerprint=None, null=None, robust: bool = True) -> Labels:
    """Per-sample routes from one or more results stores of the same task (see the module docstring);
    ``null``: the null searches' stores for the robust filter (default: each store's ``DIR-null``)."""
    if isinstance(stores, (str, bytes)) or hasattr(stores, "is_dir"):
        stores = [stores]
    found: Labels | None = None
    for path in stores:
        header, records = read_store(path)
        spec, options = _store_task(path, header)
        if found is None:
            found = Labels(spec, options, options["seed"], {}, {})
        elif (spec, options) != (found.task_spec, found.task_options):
            raise RouterError(f"{path} holds routes for task {spec!r} {options} but an earlier store is for "
                              f"{found.task_spec!r} {found.task_options}; train on one task per router")
        if fingerprint is not None and header.get("model"):
            from layerroute.models import ModelFingerprint

            ModelFingerprint.from_dict(header["model"]).check_matches(fingerprint, "label store")
        task = found.task()
        settings = header.get("settings") or {}
        split = header.get("split", settings.get("split", "search"))
        per_sample = _per_sample_routes(path, header, records, task, found, null, robust)
        if not per_sample:  # one route for the whole split (Optuna, baselines, random search)
            per_sample = _split_routes(path, records, task, split, found.seed, settings.get("limit"))
        _add_routes(found, found.validation if split == "validation" else found.search, per_sample)
    if not found.search and not found.validation:
        raise RouterError("the label stores hold no in-order routes to learn from")
    return found


def _store_task(path, header: dict) -> tuple[str, dict]:
    """The task spec a store's header names and ``get_task``'s options for reading it as the search
    did (``task_options`` of its settings; the seed: the settings', else the header's, else 0)."""
    from layerroute.search.labels import LabelError, is_null_store

    if is_null_store(header):
        raise LabelError(f"{path} was searched with --null (a random wrong label per sample): it measures "
                         f"chance and must never become router labels")
    settings = header.get("settings") or {}
    spec = settings.get("task") or header.get("task")
    if not spec:
        raise RouterError(f"{path}: the store's header names no task, so its samples cannot be found")
    return spec, task_options({**settings, "seed": int(settings.get("seed", header.get("seed", 0)))})


def _per_sample_routes(path, header: dict, records: list, task, found: Labels, null, robust: bool) -> dict:
    """uid -> layers of the store's per-sample records for samples of ``task`` (robust-filtered when
    ``robust`` and the records are an oracle search's; counted in ``found``); warns about records
    naming samples the task lacks."""
    from layerroute.search.labels import robust_layers

    uids = {ex.uid for ex in task.examples}
    per_sample = {r["key"]: _record_layers(r) for r in records
                  if r.get("type") != "summary" and r.get("key") in uids and _record_layers(r)}
    oracle = [r for r in records if r.get("key") in per_sample and "identity" in r and "margin" in r]
    if oracle and robust:
        found.threshold = _robust_filter(path, header, null)
        for r in oracle:
            L = int(r.get("num_layers") or (header.get("model") or {}).get("num_layers"))
            layers = robust_layers(r, found.threshold, L)
            per_sample[r["key"]] = layers
            edited = layers != tuple(range(L))
            found.kept += edited
            found.filtered += not edited
    unknown = sum(1 for r in records if _record_layers(r) and r.get("key") not in uids and r.get("type") != "summary")
    if per_sample and unknown:
        warnings.warn(f"{path}: {unknown} routes name samples that task {found.task_spec!r} does not have (was the "
                      f"task changed since the search?); they are ignored", stacklevel=3)
    return per_sample


def _split_routes(path, records: list, task, split: str, seed: int, limit) -> dict:
    """A store without per-sample routes: its summary route for each of the first ``limit`` examples
    of ``split``."""
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    layers = _record_layers(summary or {})
    if layers is None:
        raise RouterError(f"{path} has neither per-sample routes nor a summary route to learn from")
    examples = task.split(split, seed).examples if split != "all" else task.examples
    return {ex.uid: layers for ex in examples[:limit]}


def _add_routes(found: Labels, target: dict, per_sample: dict) -> None:
    """Put each in-order route into ``target`` (uid -> chain); count reordered ones as skipped."""
    for uid, layers in per_sample.items():
        chain = tuple(int(i) for i in layers)
        if any(a > b for a, b in zip(chain, chain[1:])):
            found.skipped += 1
            continue
        target[uid] = chain


def pass_counts(chains, num_layers: int) -> torch.Tensor:
    """[N, L] passes per block of in-order chains."""
    out = torch.zeros(len(chains), num_layers, dtype=torch.long)
    for n, chain in enumerate(chains):
        for i in chain:
            if not 0 <= i < num_layers:
                raise RouteError(f"label route {chain} has block {i}, but the model has blocks 0..{num_layers - 1}")
            out[n, i] += 1
    return out


def actions_of(counts: torch.Tensor) -> torch.Tensor:
    """Action index per layer (0 skip, 1 execute, 2 repeat) from pass counts."""
    return counts.clamp(max=2)


def prompt_batches(executor, tokenizer, task, examples, batch_size: int, chat: bool = True):
    """(indices, ids, mask) of left-padded prompt batches, as evaluation renders them."""
    prompts = encode_texts(tokenizer, task_prompts(tokenizer, task, examples, chat))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], tokenizer, executor.device)
        yield idx, ids, mask


@dataclass
class RouterData:
    """Router inputs: ``features`` [N, L, W, H], ``valid`` [N, W], ``labels`` [N, L] (action index)."""

    features: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @staticmethod
    def concat(parts) -> RouterData:
        return RouterData(*(torch.cat([getattr(p, f) for p in parts]) for f in ("features", "valid", "labels")))


def collect(executor: RouteExecutor, tokenizer, task, examples, counts: torch.Tensor, windows: int,
            net: RouterNetwork | None = None, batch_size: int = 16, desc: str = "features") -> RouterData:
    """Features along the searched routes (``net`` None: teacher forcing) or along the routers'
    own decisions (on-policy), labelled with the searched routes' actions."""
    n, L = counts.shape
    feats = valid = None
    for idx, ids, mask in tqdm(list(prompt_batches(executor, tokenizer, task, examples, batch_size)), desc=desc,
                               unit="batch", leave=False):
        if net is None:
            w = walk(executor, ids, mask, forced=counts[idx], collect=True, windows=windows)
        else:
            w = walk(executor, ids, mask, net, collect=True)
        if feats is None:
            feats = torch.zeros(n, L, *w.features.shape[2:])
            valid = torch.zeros(n, w.valid.shape[1], dtype=torch.bool)
        feats[idx], valid[idx] = w.features, w.valid
    return RouterData(feats, valid, actions_of(counts))


def class_weights(labels: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Effective-number weights (1 - beta) / (1 - beta^n_c) of the loaded label counts, normalised
    to mean 1 over the classes present (absent classes get 0)."""
    n = torch.bincount(labels.reshape(-1), minlength=NUM_ACTIONS).double()
    present = n > 0
    w = torch.where(present, (1 - beta) / (1 - beta ** n).clamp(min=1e-12), torch.zeros_like(n))
    return (w / w[present].sum() * present.sum()).float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Class-weighted focal loss, averaged over the (sample, layer) decisions."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, target[..., None]).squeeze(-1)
    return (-weight[target] * (1 - logp.exp()).pow(gamma) * logp).mean()


def agreement(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Share of per-layer decisions that match, and of samples whose whole route matches."""
    same = pred == labels
    return {"agreement": float(same.float().mean()), "route_match": float(same.all(1).float().mean())}


@torch.no_grad()
def evaluate_data(net: RouterNetwork, data: RouterData, weight: torch.Tensor, batch_size: int = 64) -> dict:
    net.eval()
    losses, preds = [], []
    for j in range(0, len(data), batch_size):
        logits = net(data.features[j:j + batch_size], data.valid[j:j + batch_size])
        losses.append(focal_loss(logits, data.labels[j:j + batch_size], weight) * logits.shape[0])
        preds.append(logits.argmax(-1))
    return {"loss": float(sum(losses) / len(data)), **agreement(torch.cat(preds), data.labels)}


def fit(net: RouterNetwork, train: RouterData, val: RouterData, weight: torch.Tensor, *, epochs: int = 20,
        batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01, warmup: float = 0.1,
        patience: int = 5, seed: int = 0, progress: bool = True, desc: str = "train routers") -> list[dict]:
    """Mini-batch training with early stopping on validation loss; restores the best epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train) / batch_size)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    best, best_state, history, bad = math.inf, None, [], 0
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        net.train()
        for idx in torch.randperm(len(train), generator=gen).split(batch_size):
            loss = focal_loss(net(train.features[idx], train.valid[idx]), train.labels[idx], weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        row = {"epoch": epoch + 1, "train": evaluate_data(net, train, weight), "val": evaluate_data(net, val, weight)}
        history.append(row)
        bar.set_postfix(val_loss=f"{row['val']['loss']:.4f}", val_agree=f"{row['val']['agreement']:.3f}")
        if row["val"]["loss"] < best - 1e-6:
            best, bad = row["val"]["loss"], 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history


def on_policy_agreement(net: RouterNetwork, executor, tokenizer, task, examples, counts, batch_size=16) -> dict:
    """The routers' own prefill walk against the searched routes' actions."""
    pred = torch.zeros_like(counts)
    for idx, ids, mask in prompt_batches(executor, tokenizer, task, examples, batch_size):
        pred[idx] = walk(executor, ids, mask, net).counts
    return {**agreement(actions_of(pred), actions_of(counts)), "mean_blocks": float(pred.sum(1).float().mean())}


def _split_ids(labels: Labels, val_share: float, seed: int) -> tuple[list[str], list[str], bool]:
    """Train and validation uids (sorted), and whether the validation ones were held out: the labels'
    validation split, else a seeded ``val_share`` of the training samples."""
    train_ids = sorted(labels.search)
    val_ids = sorted(labels.validation)
    held_out = not val_ids
    if held_out:
        shuffled = train_ids[:]
        random.Random(seed).shuffle(shuffled)
        k = max(1, round(val_share * len(shuffled)))
        if len(shuffled) - k < 1:
            raise RouterError(f"only {len(shuffled)} labelled samples: too few to hold out a validation share")
        val_ids, train_ids = sorted(shuffled[:k]), sorted(shuffled[k:])
    return train_ids, val_ids, held_out


def train_routers(executor: RouteExecutor, tokenizer, labels: Labels, *, bottleneck: int = 128, windows: int = 8,
                  dropout: float = 0.0, budget=None, epochs: int = 20, batch_size: int = 32, lr: float = 1e-3,
                  weight_decay: float = 0.01, patience: int = 5, refine_epochs: int = 5, val_share: float = 0.2,
                  feature_batch: int = 16, seed: int = 0, base_model: str = "", progress: bool = True,
                  task=None, keep_refined: bool | None = None) -> tuple[RouterNetwork, dict]:
    """Train routers on ``labels`` (see the module docstring); returns the network and a report.
    ``task`` overrides the task the labels name (for tasks built in code); ``keep_refined``
    True/False keeps or drops the refinement whatever it measured (None: keep it if it helps)."""
    torch.manual_seed(seed)
    task = task if task is not None else labels.task()
    by_uid = {ex.uid: ex for ex in task.examples}
    train_ids, val_ids, held_out = _split_ids(labels, val_share, seed)
    chains = {**labels.search, **labels.validation}
    L = executor.num_layers
    c_train, c_val = pass_counts([chains[u] for u in train_ids], L), pass_counts([chains[u] for u in val_ids], L)
    ex_train, ex_val = [by_uid[u] for u in train_ids], [by_uid[u] for u in val_ids]
    fp = executor.fingerprint
    from layerroute.models import weights_digest

    config = RouterConfig(num_layers=L, hidden_size=fp.hidden_size, bottleneck=bottleneck, windows=windows,
                          dropout=dropout, budget=None if budget is None else str(budget), base_model=base_model,
                          model=fp.to_dict(), weights_digest=weights_digest(executor.model))
    net = RouterNetwork(config).to(executor.device)
    train = collect(executor, tokenizer, task, ex_train, c_train, windows, batch_size=feature_batch,
                    desc="teacher-forced features (train)")
    val = collect(executor, tokenizer, task, ex_val, c_val, windows, batch_size=feature_batch,
                  desc="teacher-forced features (val)")
    weight = class_weights(train.labels)
    opts = dict(batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience, progress=progress)
    history = fit(net, train, val, weight, epochs=epochs, seed=seed, **opts)
    before = on_policy_agreement(net, executor, tokenizer, task, ex_val, c_val, feature_batch)
    report = {"task": labels.task_spec, "task_options": labels.task_options, "train_samples": len(train_ids),
              "val_samples": len(val_ids), "val_held_out": held_out, "skipped_reordered": labels.skipped,
              "label_counts": torch.bincount(train.labels.reshape(-1), minlength=NUM_ACTIONS).tolist(),
              "class_weights": [round(float(w), 4) for w in weight], "epochs_run": len(history),
              "teacher_forced_val": history[-1]["val"] if history else None,
              "best_val": min((h["val"] for h in history), key=lambda v: v["loss"]),
              "on_policy_val": before, "seed": seed, "parameters": net.num_parameters(),
              "share_of_base": net.share_of(executor.model)}
    if refine_epochs > 0:
        teacher = {k: v.clone() for k, v in net.state_dict().items()}
        own = collect(executor, tokenizer, task, ex_train, c_train, windows, net, batch_size=feature_batch,
                      desc="on-policy features (train)")
        fit(net, RouterData.concat([train, own]), val, weight, epochs=refine_epochs, seed=seed + 1,
            desc="refine on-policy", **{**opts, "lr": lr / 2})
        after = on_policy_agreement(net, executor, tokenizer, task, ex_val, c_val, feature_batch)
        kept = after["agreement"] >= before["agreement"] if keep_refined is None else keep_refined
        if not kept:
            net.load_state_dict(teacher)
        report["refinement"] = {"on_policy_val_before": before, "on_policy_val_after": after, "kept": kept}
    net.config.training = report
    return net, report


@dataclass
class TrainRouterConfig:
    """``layerroute train-router``: where the labels are, where the routers go, and how they train."""

    labels: list
    output: str
    null_labels: list | None = None
    robust: bool = True  # False: learn every searched route as it is (--no-filter)
    overwrite: bool = False
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 5
    refine_epochs: int = 5
    val_share: float = 0.2
    bottleneck: int = 128
    windows: int = 8
    budget: str | None = None
    tau: float | None = None  # None: chosen on the validation split
    epsilon: float = 0.01
    tau_limit: int = 100
    seed: int = 0
    base_model: str = ""


def train_router_run(config: TrainRouterConfig, load) -> Path:
    """Labels from stores -> routers saved in ``config.output``; ``load()`` gives (model, tokenizer).
    Everything that can be refused is refused before ``load`` runs."""
    from .network import CONFIG_NAME
    from .routed_model import save_routers

    out = Path(config.output)
    if (out / CONFIG_NAME).exists() and not config.overwrite:
        raise RouterError(f"{out} already holds routers; choose another --output or pass --overwrite")
    load_labels(config.labels, null=config.null_labels, robust=config.robust)  # checked before loading
    model, tok = load()
    executor = RouteExecutor(model)
    labels = load_labels(config.labels, executor.fingerprint, null=config.null_labels, robust=config.robust)
    if labels.threshold is not None:
        print(f"robust labels: a searched route is kept where its margin gain over the full route exceeds "
              f"{labels.threshold:.3f} nats (at most 5% of the null search exceed it); {labels.kept} of "
              f"{labels.kept + labels.filtered} samples kept an edited route, the others learn the full route")
    net, report = train_routers(
        executor, tok, labels, bottleneck=config.bottleneck, windows=config.windows, budget=config.budget,
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, patience=config.patience,
        refine_epochs=config.refine_epochs, val_share=config.val_share, seed=config.seed,
        base_model=config.base_model)
    _set_tau(net, config, executor, tok, labels)
    save_routers(out, net)
    print(training_summary(report, labels.task_spec, out))
    warn_if_degenerate(net, executor, tok, labels.task().split("validation", labels.seed))
    return out


def _set_tau(net, config: TrainRouterConfig, executor, tok, labels) -> None:
    if config.tau is not None:
        net.config.tau = config.tau
        print(f"tau {config.tau} (given with --tau)")
        return
    from .tau import calibrate_tau, describe

    cal = calibrate_tau(net, executor, tok, labels.task(), labels.seed, limit=config.tau_limit, epsilon=config.epsilon)
    print(describe(cal))


def training_summary(report: dict, task_spec: str, out: Path) -> str:
    """The training run in a few lines, ending with the files written."""
    refine = report.get("refinement")
    return "\n".join([
        f"trained routers for {task_spec}: {report['train_samples']} train / {report['val_samples']} "
        f"validation samples ({'held out of the search split' if report['val_held_out'] else 'validation split'})",
        f"parameters: {report['parameters']:,} ({100 * report['share_of_base']:.3f}% of the base model)",
        f"labels skip/execute/repeat: {report['label_counts']}; class weights {report['class_weights']}",
        f"validation agreement: {report['best_val']['agreement']:.3f} per layer, "
        f"{report['best_val']['route_match']:.3f} whole routes (teacher forced); on-policy "
        f"{report['on_policy_val']['agreement']:.3f}" +
        (f" -> {refine['on_policy_val_after']['agreement']:.3f} after refinement "
         f"({'kept' if refine['kept'] else 'discarded'})" if refine else ""),
        f"wrote {out / 'routers.safetensors'}, {out / 'router_config.json'} and {out / 'policy_config.json'} "
        f"(evaluate with: layerroute eval --router {out})"])


def warn_if_degenerate(net, executor, tok, task, limit: int = 32) -> None:
    """Print a warning when the trained routers' routes on ``task``'s first samples are degenerate."""
    import sys

    from layerroute.evaluation import degenerate_warning, policy_blocks

    from .routed_model import RouterPolicy

    if len(task):
        warning = degenerate_warning(policy_blocks(executor, tok, task, RouterPolicy(net), limit), executor.num_layers)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
