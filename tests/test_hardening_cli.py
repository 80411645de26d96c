"""Hardening, round two (issue 23): the newer commands' bad inputs, silent wrong meanings and Ray
addresses. Every case ends in one clear `error:` line with exit status 2, no traceback, and
nothing left behind, or works with its documented meaning. Servers that are not Ray heads are
started by the tests on 127.0.0.1 and stopped again; no test contacts any other address."""

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from layerroute import RouteExecutor, model_fingerprint
from layerroute.cli import main
from layerroute.models import weights_digest
from layerroute.store import ResultsStore, StoreError, read_store

from .conftest import tiny_model

TASK = ["--task", "suite:capitals"]


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _gguf(d):
    import gguf

    w = gguf.GGUFWriter(str(d / "t.gguf"), "llama")
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(200)])
    w.add_tensor("a", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (d / "t.gguf").read_bytes()
    (d / "cut_meta.gguf").write_bytes(data[:200])
    (d / "cut_data.gguf").write_bytes(data[:-100])


def _routers(d, model):
    from layerroute.routers import RouterConfig, RouterNetwork, save_routers

    fp = model_fingerprint(model)
    torch.manual_seed(0)
    net = RouterNetwork(RouterConfig(num_layers=fp.num_layers, hidden_size=fp.hidden_size, model=fp.to_dict(),
                                     weights_digest=weights_digest(model)))
    with torch.no_grad():
        for r in net.routers:
            r[-1].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # every router asks for a repeat
    save_routers(d / "routers", net)
    for name in ("nan", "int", "nodigest"):
        shutil.copytree(d / "routers", d / f"routers_{name}")
    w = load_file(str(d / "routers" / "routers.safetensors"))
    _save(d / "routers_nan" / "routers.safetensors", {**w, "routers.0.0.weight": w["routers.0.0.weight"] * np.nan})
    _save(d / "routers_int" / "routers.safetensors", {k: v.to(torch.int32) for k, v in w.items()})
    _edit_json(d / "routers_nodigest" / "router_config.json", weights_digest=None)


def _ppo(d, model):
    from layerroute.envs.mdp import MDPSpec, ObsProjection
    from layerroute.policies.ppo_policy import ActorNet, PPOPolicy

    fp = model_fingerprint(model)
    torch.manual_seed(0)
    proj = ObsProjection(torch.zeros(fp.hidden_size), torch.randn(4, fp.hidden_size), torch.ones(4))
    actor = ActorNet(4 + 2, fp.num_layers, 3)
    PPOPolicy(actor, proj, MDPSpec("per_sample", fp.num_layers), fp, {}, weights_digest(model)).save(d / "ppo")
    for name in ("cola", "nan", "nodigest"):
        shutil.copytree(d / "ppo", d / f"ppo_{name}")
    _edit_json(d / "ppo_cola" / "policy_config.json", mode="cola")
    w = load_file(str(d / "ppo" / "policy.safetensors"))
    _save(d / "ppo_nan" / "policy.safetensors", {**w, "obs.scale": w["obs.scale"] * np.inf})
    _edit_json(d / "ppo_nodigest" / "policy_config.json", weights_digest=None)


def _store_variants(d):
    """Copies of a real MCTS store, each edited in one way."""
    lines = (d / "store" / "results.jsonl").read_text().splitlines()
    header, first = json.loads(lines[0]), json.loads(lines[1])

    def variant(name, head=header, body=lines[1:]):
        (d / name).mkdir()
        (d / name / "results.jsonl").write_text("\n".join([json.dumps(head)] + body) + "\n")

    variant("dup", body=[lines[1]] + lines[1:])
    variant("nan", body=[json.dumps({**first, "reward": float("nan")})] + lines[2:])
    variant("layer99", body=[json.dumps({**first, "layers": [99] + first["layers"]})] + lines[2:])
    variant("nodigest", head={k: v for k, v in header.items() if k != "weights_digest"})
    variant("otherdigest", head={**header, "weights_digest": "0123456789abcdef"})
    (d / "empty.jsonl").write_text("")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A tiny model, a real MCTS store of it, and broken copies of routers, policies, stores and GGUFs."""
    from tokenizers import Tokenizer, models

    d = tmp_path_factory.mktemp("round2")
    words = models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words))
    model = tiny_model("llama")
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    assert main(["search", "mcts", "--model", str(d / "model"), *TASK, "--limit", "2", "--simulations", "2",
                 "--output", str(d / "store")]) == 0
    _store_variants(d)
    _gguf(d)
    _routers(d, model)
    _ppo(d, model)
    RouteExecutor(model).route("skip:1").save(d / "route.json")
    with zipfile.ZipFile(d / "sb3.zip", "w") as z:
        z.writestr("data", "{}")
    (d / "MixedCase").mkdir()
    return d


def _loopback_server(kind):
    """A server on 127.0.0.1 that is not a Ray head: ``silent`` accepts and says nothing, ``http`` answers HTTP."""
    if kind == "http":
        srv = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv.server_address[1], srv.shutdown
    sock = socket.create_server(("127.0.0.1", 0))
    conns = []

    def accept():
        try:
            while True:
                conns.append(sock.accept()[0])  # held open, never answered
        except OSError:  # closed
            pass

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1], sock.close


def cases(d):
    """(arguments, what the one error line must say)."""
    out = ["--output", str(d / "out" / "run")]
    m = ["--model", str(d / "model")]
    train = ["train-router", *m] + out
    eval_ = ["eval", *m, *TASK, "--limit", "2"]
    run = ["run", *m, "--prompt", "hi"]
    huge = "1180591620717411303424"
    return [
        (["run", "--model", "smollm9-999m", "--prompt", "hi"], r"^error: unknown model 'smollm9-999m': not an "
                                                               r"embedded model \(smollm2-135m\), not a local path"),
        (["run", "--model", "no-such-org/no-such-model", "--prompt", "hi"], r"unknown model 'no-such-org/no-such"),
        (["info", "--model", str(d / "cut_meta.gguf")], r"cut_meta.gguf is truncated: it ends inside its metadata"),
        (["info", "--model", str(d / "cut_data.gguf")], r"cut_data.gguf is truncated: its tensor data ends at byte "
                                                        r"\S+ but the file has \S+ bytes"),
        (train + ["--labels", str(d / "store"), "--bottleneck", "1099511627776"],
         r"^error: --bottleneck must be an integer in \[1, 16384\], got 1099511627776$"),
        (train + ["--labels", str(d / "store"), "--windows", "100000"], r"--windows must be an integer in \[1, 1024\]"),
        (train + ["--labels", str(d / "store"), "--seed", huge], r"--seed must be an integer in \[0, 4294967295\]"),
        (["search", "random_search", *m, *TASK, "--seed", huge] + out, r"--seed must be an integer in \[0, 4294967295"),
        (["search", "mcts", *m, *TASK, "--seed", "-1"] + out, r"--seed must be an integer in \[0, 4294967295\]"),
        (["analyze", str(d / "layer99")], r"layer99/results.jsonl line 2 \(key '[^']+'\) has a route with block 99, "
                                          r"but the store's model has blocks 0..4"),
        (train + ["--labels", str(d / "layer99")], r"line 2 \(key '[^']+'\) has a route with block 99"),
        (["analyze", str(d / "dup")], r"dup/results.jsonl line 3 \(key '[^']+'\) repeats the record of line 2"),
        (train + ["--labels", str(d / "dup")], r"line 3 \(key '[^']+'\) repeats the record of line 2"),
        (["analyze", str(d / "nan")], r"nan/results.jsonl line 2 \(key '[^']+'\) has a NaN reward"),
        (train + ["--no-filter", "--labels", str(d / "nodigest")], r"nodigest: this results store records no weights digest \(it "
                                                    r"was saved before layerroute required one\)"),
        (train + ["--no-filter", "--labels", str(d / "otherdigest")], r"otherdigest: this results store was made on another "
                                                       r"checkpoint of the same shape \(weights digest 0123456789abcd"),
        (run + ["--router", str(d / "routers_nan")], r"routers_nan/routers.safetensors: tensor routers.0.0.weight "
                                                     r"holds NaN or infinite values"),
        (run + ["--router", str(d / "routers_int")], r"tensor \S+ is torch.int32, but router_config.json makes it "
                                                     r"torch.float32"),
        (run + ["--router", str(d / "routers_nodigest")], r"routers_nodigest: this router \(unnamed base\) records no "
                                                          r"weights digest"),
        (eval_ + ["--policy", str(d / "ppo_cola")], r"trained in mode 'per_sample' \(its actor has 3 actions\) but "
                                                    r"policy_config.json says mode 'cola' \(6 actions\)"),
        (eval_ + ["--policy", str(d / "ppo_nan")], r"policy.safetensors: tensor obs.scale holds NaN or infinite"),
        (eval_ + ["--policy", str(d / "ppo_nodigest")], r"this PPO policy records no weights digest"),
        (eval_ + ["--route", "skip:1", "--budget", "0.5"], r"^error: --budget applies to --baseline and trained "
                                                           r"routers only; a route runs the blocks it names$"),
        (eval_ + ["--policy", str(d / "ppo"), "--budget", "0.5"], r"ppo is a ppo policy, which runs the blocks"),
        (run + ["--route", "repeat:10x"], r"'repeat:10x': no pass count after 'x'"),
        (["baselines", *m, *TASK, "--budgets", "0.8,0.8"] + out, r"^error: --budgets names 0.8 twice in '0.8,0.8'$"),
        (eval_ + ["--router", "/nonexistent"], r"^error: --router /nonexistent does not exist$"),
        (eval_ + ["--policy", str(d / "routers" / "routers.safetensors")],
         r"routers.safetensors is a safetensors weights file, not a saved policy"),
        (eval_ + ["--policy", str(d / "sb3.zip")], r"sb3.zip is a zip archive \(a Stable-Baselines3 checkpoint"),
        (eval_ + ["--policy", str(d / "store" / "results.jsonl")], r"results.jsonl is a layerroute results store "
                                                                   r"\(results.jsonl\), not a saved policy"),
        (run + ["--router", str(d / "route.json")], r"route.json is a route file, not a router directory .*; run a "
                                                    r"route with --route"),
        (train + ["--labels", str(d / "empty.jsonl")], r"empty.jsonl is empty or has no complete header line; it is "
                                                       r"not a finished results store$"),
        (["analyze", str(d / "empty.jsonl")], r"empty.jsonl is empty or has no complete header line; it is not a "
                                              r"finished results store$"),
        (run + ["--route", str(d / "MixedCase")], r"MixedCase is a directory, not a route file \(JSON\) or a route"),
    ]


def _one_error_line(capsys, code, argv, message):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (model loading may show a progress bar)
    assert code == 2, (argv, err)
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, (argv, err)
    assert re.search(message, errors[0]), (argv, errors[0])
    return errors[0]


def test_every_case_is_one_line_with_exit_status_2(d, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # unknown hub ids: no network
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    for argv, message in cases(d):
        line = _one_error_line(capsys, main(argv), argv, message)
        assert "--overwrite" not in line or argv[0] not in ("analyze", "train-router"), line
        assert not (d / "out").exists(), argv  # nothing created
        assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before, argv  # nothing changed


@pytest.mark.parametrize("kind", ["silent", "http"])
def test_an_address_that_is_not_a_ray_head_fails_within_10_s(d, tmp_path, capsys, kind):
    port, stop = _loopback_server(kind)
    try:
        t = time.monotonic()
        argv = ["search", "mcts", "--model", str(d / "model"), *TASK, "--limit", "2", "--output",
                str(tmp_path / "out" / "run"), "--ray-address", f"127.0.0.1:{port}"]
        code = main(argv)
        took = time.monotonic() - t
    finally:
        stop()
    why = {"silent": r"something accepts TCP connections there but did not answer in 3 s",
           "http": r"something answers there, but not in gRPC \(an HTTP server\?\)"}[kind]
    _one_error_line(capsys, code, argv, rf"^error: 127.0.0.1:{port} is not a Ray head: {why}; give the address that "
                                        rf"`ray start --head --port PORT` prints \(the head's GCS port\)$")
    assert took < 10, took
    assert not (tmp_path / "out").exists()  # no header-only store


def test_a_grpc_server_that_is_not_a_ray_head_and_a_head_wanting_a_token_are_refused_at_once(monkeypatch):
    """gRPC servers on 127.0.0.1: one without Ray's GCS service, one that asks for a token like a Ray head
    with token authentication (when this machine has no token)."""
    import grpc
    from concurrent import futures

    from layerroute.search import distributed
    from layerroute.search.distributed import DistributedError, check_ray_head

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")

    servers = {kind: grpc.server(futures.ThreadPoolExecutor(1)) for kind in ("plain", "token")}
    servers["token"].add_generic_rpc_handlers([grpc.method_handlers_generic_handler("ray.rpc.NodeInfoGcsService", {
        "GetClusterId": grpc.unary_unary_rpc_method_handler(refuse, bytes, bytes)})])
    ports = {kind: server.add_insecure_port("127.0.0.1:0") for kind, server in servers.items()}
    for server in servers.values():
        server.start()
    monkeypatch.setattr(distributed, "_token_available", lambda: False)
    try:
        t = time.monotonic()
        with pytest.raises(DistributedError, match=rf"^127.0.0.1:{ports['plain']} is not a Ray head: a gRPC server "
                                                   rf"answers there, but not Ray's GCS \(UNIMPLEMENTED\)"):
            check_ray_head(f"127.0.0.1:{ports['plain']}")
        with pytest.raises(DistributedError, match=rf"^the Ray head at 127.0.0.1:{ports['token']} requires token "
                                                   rf"authentication, and no token is set here"):
            check_ray_head(f"127.0.0.1:{ports['token']}")
        assert time.monotonic() - t < 10
    finally:
        for server in servers.values():
            server.stop(None)


def test_the_store_lock_is_taken_before_the_model_loads(d, tmp_path, capsys, monkeypatch):
    def load_model(*a, **kw):
        raise AssertionError("the model was loaded before the store's lock was taken")

    monkeypatch.setattr("layerroute.models.load_model", load_model)
    common = ["--model", str(d / "model"), *TASK, "--output", str(tmp_path / "run")]
    with ResultsStore(tmp_path / "run"):  # another writer holds it
        for argv in (["eval", *common], ["baselines", *common], ["search", "mcts", *common],
                     ["train-ppo", *common, "--timesteps", "8"]):
            _one_error_line(capsys, main(argv), argv, r"run/results.jsonl is being written by another process")
    with ResultsStore(tmp_path / "pipe" / "search-null"):
        argv = ["pipeline", "--model", str(d / "model"), "--output", str(tmp_path / "pipe")]
        _one_error_line(capsys, main(argv), argv, r"pipe/search-null/results.jsonl is being written by another")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["search-null"]  # its own lock file: gone


def test_a_failed_run_leaves_no_header_only_store(tmp_path):
    with pytest.raises(RuntimeError), ResultsStore(tmp_path / "a" / "b") as store:
        store.open({"kind": "test"})
        raise RuntimeError("the run failed before its first record")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), ResultsStore(tmp_path / "c") as store:  # a record was written: kept
        store.open({"kind": "test"})
        store.append({"key": "x"})
        raise RuntimeError("the run failed later")
    assert read_store(tmp_path / "c")[1] == [{"key": "x"}]
    with pytest.raises(StoreError, match="repeats the record of line 2"), ResultsStore(tmp_path / "c") as store:
        (tmp_path / "c" / "results.jsonl").write_text((tmp_path / "c" / "results.jsonl").read_text() + '{"key": "x"}\n')
        store.open({"kind": "test"})  # resuming an edited store is refused too


def test_stores_carry_the_weights_digest_and_eval_applies_the_router_budget(d, tmp_path, capsys):
    from layerroute import load_model

    model, _ = load_model(str(d / "model"))
    assert read_store(d / "store")[0]["weights_digest"] == weights_digest(model)
    common = ["eval", "--model", str(d / "model"), *TASK, "--limit", "3", "--router", str(d / "routers")]
    assert main(common + ["--output", str(tmp_path / "full")]) == 0
    assert main(common + ["--budget", "0.4", "--output", str(tmp_path / "budget")]) == 0
    full, budget = (read_store(tmp_path / p)[1][-1]["metrics"]["mean_blocks"] for p in ("full", "budget"))
    assert full == 10 and budget == 2  # every router repeats; 0.4 of 5 blocks allows 2
    assert read_store(tmp_path / "budget")[0]["weights_digest"] == weights_digest(model)


# ---- a real Ray head on loopback ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("loopback_only", [False, True], ids=["head-on-node-ip", "head-on-loopback-only"])
def test_a_ray_head_started_on_loopback_is_joined_and_gives_the_local_records(d, tmp_path, loopback_only):
    """``ray start --head --node-ip-address=127.0.0.1`` registers the node's IP, unless Ray keeps
    loopback (here forced with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as on a machine whose only
    address is loopback); then its GCS listens on 127.0.0.1 alone. Both are joined at 127.0.0.1."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="lr-ray-")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if loopback_only:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(1)
        common = ["search", "mcts", "--model", str(d / "model"), *TASK, "--limit", "4", "--simulations", "2"]
        assert main(common + ["--output", str(tmp_path / "ray"), "--ray-address", f"127.0.0.1:{port}"]) == 0
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head stops its own processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the head's own session: processes this test started
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    assert main(common + ["--output", str(tmp_path / "local")]) == 0
    timing = ("seconds", "peak_cache_bytes")  # wall time and cache peaks depend on the machine and the grouping

    def records(path):
        return sorted(({k: v for k, v in r.items() if k not in timing} for r in read_store(path)[1]
                       if r.get("type") != "summary"), key=lambda r: r["key"])

    assert len(records(tmp_path / "ray")) == 4 and records(tmp_path / "ray") == records(tmp_path / "local")
