"""Token-sparse blocks: realised speedup against dense and against the ideal from counted FLOPs.

    OMP_NUM_THREADS=2 python -m layerroute.experiments.bench_token_sparse [--device cuda] [--repeats 5]

On a shared CPU, ``--threads 1`` (with ``OMP_NUM_THREADS=1``) is the robust choice: with two threads
and other processes on both cores, every matrix product waits for the descheduled thread (a
batch-8 decoding step of SmolLM2-135M measured 2 s with 2 threads against 0.25 s with 1).

Every block runs a given share of the tokens (75%, 50%, 25%): exactly that share of each row's
tokens per block in prefill, and of the batch's rows per block and decoded token in decoding,
chosen at random. Rules (``layerroute.sparse``): ``kv-kept`` (skipped tokens still compute K/V),
``absent`` (skipped tokens are not in the block), and the dense ``token_mask`` path that
computes kv-kept's result on every token (what FlexiDepth does; its cost does not depend on the
share). The baseline is the plain dense walk (no mask).

* **Prefill**: ``--prefill-batch`` x ``--prefill-tokens`` (default 4 x 512), last-position logits.
* **Decoding**: ``--decode-batch`` rows (default 8), a ``--decode-prompt``-token prompt run under
  the same rule and share (not timed), then ``--decode-new`` cached steps (timed) on fixed
  tokens, so every variant does the same work. Decoding also times each rule at 50% with the rows
  agreeing (``, rows agree``): at each step the same half of the blocks runs for every row, as
  SkipDecode arranges, so a skipped block costs nothing; with a share of the *rows* per block, the
  block's weights are still read for the others, which at batch 8 is most of its cost.

The ideal speedup is dense FLOPs over the variant's FLOPs, counted from the actual masks:
projections and MLP of executed tokens, the K/V projections of kv-kept's skipped tokens,
attention over the keys each executed query sees (all earlier tokens under kv-kept, earlier
executed tokens under absent), and the LM head (one position per row per call). Norms,
rotary and embeddings are not counted. Times are medians over ``--repeats`` interleaved
repeats, wall clock and this process's CPU time (robust to a shared machine; on CUDA only
wall time is meaningful). Results go to ``OUT/<name>.md`` and ``.json`` (``--out``; the committed ones:
``--out experiments/results``),
rewritten after every measurement, with the command, date and machine load in the header.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from layerroute.config import option, parse_config
from layerroute.experiments import SeededArgs, experiment_command

TARGET_PREFILL = 0.8  # realised / ideal


@dataclass
class Args(SeededArgs):
    device: str = option("cpu", "cpu or cuda")
    dtype: str = option("float32", "float32, bfloat16 or float16", choices=["float32", "bfloat16", "float16"])
    threads: int = option(2, "torch threads on the CPU")
    shares: str = option("0.75,0.5,0.25", "executed shares of tokens per block, comma-separated")
    rules: str = option("kv-kept,absent", "sparse rules to time, comma-separated")
    prefill_batch: int = option(4, "prefill rows")
    prefill_tokens: int = option(512, "prefill tokens per row")
    decode_batch: int = option(8, "decoding rows")
    decode_prompt: int = option(128, "prompt tokens before decoding (not timed)")
    decode_new: int = option(32, "timed cached decoding steps")
    repeats: int = option(5, "interleaved repeats; medians are reported")
    parts: str = option("prefill,decode", "what to run")
    name: str = option("bench_token_sparse", "writes OUT/<name>.md and .json")


# ---- FLOPs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model) -> Shape:
        c = model.config
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, d,
                   c.intermediate_size, c.vocab_size)

    @property
    def kv_proj(self) -> int:  # MACs per token
        return 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def token_block(self) -> int:  # MACs per executed token, without attention over keys
        qo = 2 * self.hidden * self.heads * self.head_dim
        return qo + self.kv_proj + 3 * self.hidden * self.intermediate

    def attention(self, keys) -> float:  # MACs of one query over ``keys`` keys (QK and AV)
        return 2 * self.heads * self.head_dim * keys


def block_flops(shape: Shape, execute: torch.Tensor, past_keys: torch.Tensor, rule: str | None) -> float:
    """FLOPs of one block over a call: ``execute`` [B, q] (None: dense), ``past_keys`` [B] the
    keys already in the slot for each row (absent: executed ones only)."""
    B, q = execute.shape
    ex = execute.double()
    if rule == "absent":
        keys = past_keys[:, None] + ex.cumsum(1)  # earlier executed tokens, itself included
    else:
        keys = past_keys[:, None] + torch.arange(1, q + 1, dtype=torch.float64)[None]
    macs = (ex * (shape.token_block + shape.attention(keys))).sum()
    if rule == "kv-kept":
        macs = macs + (1 - ex).sum() * shape.kv_proj
    return 2 * float(macs)


def walk_flops(shape: Shape, masks: list[torch.Tensor], rule: str | None, past_keys=None) -> tuple[float, list]:
    """FLOPs of a call whose per-block masks are ``masks[l]`` [B, q], plus the LM head for one
    position per row; returns the slot sizes after the call (for the next decoding step)."""
    B = masks[0].shape[0]
    past_keys = past_keys or [torch.zeros(B, dtype=torch.float64) for _ in masks]
    total, after = 0.0, []
    for m, pk in zip(masks, past_keys):
        total += block_flops(shape, m, pk, rule)
        after.append(pk + (m.double().sum(1) if rule == "absent" else m.shape[1]))
    return total + 2.0 * B * shape.hidden * shape.vocab, after


# ---- masks ------------------------------------------------------------------------------------
def token_share_mask(batch: int, layers: int, tokens: int, share: float, g: torch.Generator) -> torch.Tensor:
    """[B, L, T]: exactly round(share * T) tokens of each row execute each block."""
    k = round(share * tokens)
    return torch.rand(batch, layers, tokens, generator=g).argsort(-1).argsort(-1) < k


def row_share_mask(batch: int, layers: int, steps: int, share: float, g: torch.Generator) -> torch.Tensor:
    """[B, L, steps]: exactly round(share * B) rows execute each block at each step."""
    k = round(share * batch)
    return torch.rand(batch, layers, steps, generator=g).argsort(0).argsort(0) < k


def agreed_mask(batch: int, layers: int, steps: int, share: float, g: torch.Generator) -> torch.Tensor:
    """[B, L, steps]: at each step exactly round(share * L) blocks run, the same ones for every row
    (the batch agrees, as SkipDecode arranges): a skipped block costs no row anything."""
    k = round(share * layers)
    return (torch.rand(1, layers, steps, generator=g).argsort(1).argsort(1) < k).expand(batch, layers, steps)


# ---- timing -----------------------------------------------------------------------------------
def timed(fn, device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(fns: dict, repeats: int, device, on_repeat=None) -> dict:
    """Median wall and CPU seconds per variant; one warm-up call each; variants alternate. A
    variant's ``prepare()``, where it has one, runs before each call, outside the timer."""
    def run(fn):
        if hasattr(fn, "prepare"):
            fn.prepare()
        return timed(fn, device)

    for fn in fns.values():
        run(fn)
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            w, c = run(fn)
            wall[k].append(w)
            cpu[k].append(c)
        if on_repeat:
            on_repeat(r + 1, {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns})
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


# ---- the two parts ----------------------------------------------------------------------------
def variants(args: Args) -> list[tuple[str, str | None, float]]:
    """(label, rule, share): dense first, the dense token_mask path once (its cost ignores the share)."""
    out = [("dense (no mask)", None, 1.0), ("dense token_mask, 50%", "dense", 0.5)]
    for share in (float(s) for s in args.shares.split(",")):
        for rule in args.rules.split(","):
            out.append((f"{rule}, {share:.0%}", rule, share))
    return out


def prefill_part(ex, shape: Shape, args: Args, device, report) -> None:
    g = torch.Generator().manual_seed(args.seed)
    B, T, L = args.prefill_batch, args.prefill_tokens, shape.layers
    ids = torch.randint(100, shape.vocab - 1, (B, T), generator=g).to(device)
    fns, flops = {}, {}
    for label, rule, share in variants(args):
        tm = None if rule is None else token_share_mask(B, L, T, share, g).to(device)
        kw = {} if rule is None else dict(token_mask=tm, token_rule=rule)
        fns[label] = (lambda kw=kw: ex(ids, logits_to_keep=1, **kw))
        masks = [torch.ones(B, T, dtype=torch.bool)] * L if rule in (None, "dense") else list(tm.cpu().unbind(1))
        flops[label] = walk_flops(shape, masks, None if rule == "dense" else rule)[0]
    interleaved(fns, args.repeats, device, lambda r, t: report("prefill", variants(args), flops, t, r))


AGREE = ", rows agree"  # decoding variants whose rows skip the same blocks at each step


def decode_variants(args: Args) -> list[tuple[str, str | None, float]]:
    """``variants``, plus each sparse rule at 50% with the batch agreeing on the blocks (``agreed_mask``)."""
    return variants(args) + [(f"{rule}, 50%{AGREE}", rule, 0.5) for rule in args.rules.split(",")]


def decode_part(ex, shape: Shape, args: Args, device, report) -> None:
    g = torch.Generator().manual_seed(args.seed + 1)
    B, P, N, L = args.decode_batch, args.decode_prompt, args.decode_new, shape.layers
    prompt = torch.randint(100, shape.vocab - 1, (B, P), generator=g).to(device)
    fed = torch.randint(100, shape.vocab - 1, (B, N), generator=g).to(device)
    fns, flops = {}, {}
    for label, rule, share in decode_variants(args):
        if rule is None:
            tm = None
        else:  # prompt: a share of each row's tokens; decoding: a share of the rows per step (or of the blocks)
            steps_mask = (agreed_mask if label.endswith(AGREE) else row_share_mask)(B, L, N, share, g)
            tm = torch.cat([token_share_mask(B, L, P, share, g), steps_mask], dim=2).to(device)
        kw = {} if rule is None else dict(token_mask=tm, token_rule=rule)

        def prefill(kw=kw):
            return ex(prompt, use_cache=True, logits_to_keep=1, **kw).cache

        def steps(cache, kw=kw):
            mask = torch.ones(B, P, dtype=torch.bool, device=device)
            for i in range(N):
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
                ex(fed[:, i:i + 1], mask, cache=cache, logits_to_keep=1, **kw)

        fns[label] = _Decode(prefill, steps)
        # FLOPs of the decoding steps only (the prompt is not timed)
        r = None if rule == "dense" else rule
        full = tm.cpu() if tm is not None else torch.ones(B, L, P + N, dtype=torch.bool)
        if rule == "dense":
            full = torch.ones_like(full)
        _, slots = walk_flops(shape, list(full[:, :, :P].unbind(1)), r)
        total = 0.0
        for i in range(N):
            f, slots = walk_flops(shape, list(full[:, :, P + i:P + i + 1].unbind(1)), r, slots)
            total += f
        flops[label] = total
    interleaved(fns, args.repeats, device, lambda r, t: report("decode", decode_variants(args), flops, t, r))


class _Decode:
    """A decoding run whose prompt is prefilled by ``prepare``, outside the timer."""

    def __init__(self, prefill, steps):
        self.prefill, self.steps = prefill, steps

    def prepare(self):
        self._cache = self.prefill()

    def __call__(self):
        self.steps(self._cache)


# ---- output -----------------------------------------------------------------------------------
class Report:
    def __init__(self, args: Args, command: str, meta: dict):
        self.args, self.command, self.meta = args, command, meta
        self.parts: dict[str, dict] = {}
        self.earlier: dict[str, dict] = {}  # parts this run does not redo, kept from the last run of <name>
        old = args.path(f"{args.name}.json")
        if old.is_file():
            data = json.loads(old.read_text())
            for part, p in data.get("parts", {}).items():
                if part not in args.parts.split(","):
                    self.earlier[part] = {"command": data.get("command"), "meta": data.get("meta"),
                                          "args": data.get("args"), **p}

    def __call__(self, part, rows, flops, times, done_repeats=None):
        base = "dense (no mask)"
        out = []
        for label, rule, share in rows:
            if label not in times:
                continue
            w, c = times[label]
            ideal = flops[base] / flops[label]
            out.append(dict(variant=label, rule=rule or "none", share=share, wall_s=w, cpu_s=c,
                            speedup_wall=times[base][0] / w, speedup_cpu=times[base][1] / c,
                            ideal=ideal, gflops=flops[label] / 1e9))
        self.parts[part] = dict(rows=out, repeats_done=done_repeats or self.args.repeats)
        self.write()

    def write(self):
        a = self.args
        lines = ["# Token-sparse blocks: realised against ideal speedup\n",
                 f"`{self.command}`\n",
                 f"Run {self.meta['date']} on {self.meta['machine']}; {self.meta['threads']} torch threads, "
                 f"{a.dtype}, model {a.model} ({self.meta['layers']} blocks). Load average at start: "
                 f"{self.meta['load']}. Medians over the repeats done (interleaved). Ideal = dense FLOPs / "
                 f"variant FLOPs, counted from the actual masks (see the script's docstring).\n"]
        parts = {**self.earlier, **self.parts}
        for part in ("prefill", "decode"):
            if part not in parts:
                continue
            p = parts[part]
            pa = Args(**p["args"]) if "args" in p else a
            what = (f"Prefill, batch {pa.prefill_batch} x {pa.prefill_tokens} tokens, last-position logits"
                    if part == "prefill" else f"Decoding, batch {pa.decode_batch}, {pa.decode_prompt}-token prompt "
                                              f"(not timed), {pa.decode_new} cached steps")
            lines += [f"## {what} ({p['repeats_done']} of {pa.repeats} repeats)\n"]
            if "command" in p:
                lines += [f"From an earlier run: `{p['command']}`, {p['meta']['date']}, load average "
                          f"{p['meta']['load']}.\n"]
            lines += [
                      "| variant | GFLOPs | wall (s) | CPU (s) | speedup, wall | speedup, CPU | ideal | "
                      "wall / ideal | CPU / ideal |", "|---|---|---|---|---|---|---|---|---|"]
            for r in p["rows"]:
                lines.append(f"| {r['variant']} | {r['gflops']:.1f} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
                             f"{r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x | {r['ideal']:.2f}x | "
                             f"{r['speedup_wall'] / r['ideal']:.2f} | {r['speedup_cpu'] / r['ideal']:.2f} |")
            lines.append("")
            lines += self.verdict(part, p["rows"])
        path = a.path(f"{a.name}.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, "\n".join(lines) + "\n")
        _atomic(a.path(f"{a.name}.json"), json.dumps(dict(command=self.command, meta=self.meta, args=asdict(a),
                                                            parts=parts), indent=2, sort_keys=True) + "\n")

    def verdict(self, part, rows) -> list[str]:
        out = []
        sparse = [r for r in rows if r["rule"] in ("kv-kept", "absent")]
        if part == "prefill":
            for r in sparse:
                ratio = r["speedup_wall"] / r["ideal"]
                if ratio < TARGET_PREFILL:
                    out.append(f"- Target missed: {r['variant']} reaches {ratio:.3f} of the ideal in wall time "
                               f"(target {TARGET_PREFILL}; CPU time: {r['speedup_cpu'] / r['ideal']:.2f}).")
            if sparse and not out:
                out.append(f"- Target met: every sparse variant reaches at least {TARGET_PREFILL} of the ideal in "
                           f"wall time.")
        else:  # the dense token_mask variant does the dense work: its distance from 1x is the timing noise
            noise = [r["speedup_wall"] for r in rows if r["rule"] == "dense"]
            for r in sparse:
                if abs(r["share"] - 0.5) < 1e-9:
                    wall, cpu = 1 - 1 / r["speedup_wall"], 1 - 1 / r["speedup_cpu"]
                    word = "saves" if min(wall, cpu) > 0 else "Target missed: does not save"
                    out.append(f"- {r['variant']}: {word} decoding time: {wall:+.0%} of the dense wall time, {cpu:+.0%} "
                               f"of its CPU time (positive: saved).")
            if noise:
                out.append(f"- Noise: the dense token_mask variant does the dense work and reads "
                           f"{noise[0]:.2f}x in wall time, so wall differences of {abs(1 - noise[0]):.0%} are noise on "
                           f"this machine; CPU time is the steadier measure.")
        return out + [""]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    from layerroute import RouteExecutor, load_model

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, _ = load_model(args.model)
    model = model.to(device=device, dtype=dtype)
    ex = RouteExecutor(model)
    shape = Shape.of(model)
    argv = sys.argv[1:] if argv is None else argv
    command = experiment_command("bench_token_sparse", [shlex.quote(a) for a in argv],
                                 args.threads if device.type == "cpu" else None)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=(torch.cuda.get_device_name(device) if device.type == "cuda"
                         else f"{platform.machine()} CPU, {os.cpu_count()} cores"),
                threads=torch.get_num_threads(), layers=shape.layers,
                load=" ".join(f"{x:.1f}" for x in os.getloadavg()), torch=torch.__version__)
    report = Report(args, command, meta)
    with torch.no_grad():
        if "prefill" in args.parts:
            prefill_part(ex, shape, args, device, report)
        if "decode" in args.parts:
            decode_part(ex, shape, args, device, report)
    print(args.path(f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
