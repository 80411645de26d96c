"""The route format: specs, actions, JSON, fingerprints and cost."""

import json

import pytest

from layerroute import FingerprintMismatchError, ModelFingerprint, Route, RouteError, RouteExecutor

from .conftest import tiny_model

FP = ModelFingerprint("llama", 30, 576, block_params=3_540_096, num_heads=9)


def test_specs():
    assert Route.parse("identity", FP).layers == tuple(range(30))
    assert Route.parse("skip:20-24", FP).layers == tuple(range(20)) + tuple(range(25, 30))
    r = Route.parse("repeat:10", FP)
    assert r.layers.count(10) == 2 and r.cost == 31
    assert Route.parse("repeat:10x3+skip:0,2-3", FP).counts()[:4] == [0, 1, 0, 0]
    assert Route.parse("chain:0-2,2,1", FP).layers == (0, 1, 2, 2, 1)


def test_actions_round_trip_and_more_than_two_passes():
    actions = ["execute"] * 30
    actions[3], actions[7] = "skip", "repeat"
    r = Route.from_actions(actions, FP)
    assert r.actions() == actions and r.cost == 30
    assert Route.from_actions([1] * 29 + [4], FP).layers[-4:] == (29, 29, 29, 29)
    with pytest.raises(RouteError, match="reorders"):
        Route.parse("chain:2,1", FP).actions()


def test_json_round_trip(tmp_path):
    r = Route.parse("skip:3+repeat:5", FP)
    r.save(tmp_path / "r.json")
    assert Route.load(tmp_path / "r.json", FP) == r
    assert json.loads(r.to_json())["model"]["num_layers"] == 30


def test_cost_and_flops():
    r = Route.parse("skip:0-14", FP)
    assert r.cost == 15
    full = Route.identity(FP)
    assert r.flops(128) == pytest.approx(full.flops(128) / 2)
    assert full.flops(1) == 30 * (2 * FP.block_params + 2 * FP.hidden_size)


def test_error_layer_index_out_of_range():
    with pytest.raises(RouteError, match="layer index 30 .*out of range.*0..29"):
        Route.parse("skip:28-30", FP)
    with pytest.raises(RouteError, match="out of range"):
        Route((0, 31), FP)


def test_error_empty_route():
    with pytest.raises(RouteError, match="empty route"):
        Route((), FP)
    with pytest.raises(RouteError, match="empty route"):
        Route.parse("skip:0-29", FP)


def test_error_unknown_action():
    with pytest.raises(RouteError, match="unknown action 'jump' at layer 0"):
        Route.from_actions(["jump"] + ["execute"] * 29, FP)
    with pytest.raises(RouteError, match="unknown route action 'jump'"):
        Route.parse("jump:3", FP)


def test_error_route_for_another_model(tmp_path):
    other = ModelFingerprint("qwen2", 24, 896)
    Route.identity(other).save(tmp_path / "qwen.json")
    with pytest.raises(FingerprintMismatchError, match="made for qwen2 with 24 layers.*model is llama with 30"):
        Route.load(tmp_path / "qwen.json", FP)
    ex = RouteExecutor(tiny_model("llama"))
    with pytest.raises(FingerprintMismatchError, match="made for"):
        ex.route(Route.identity(other))


def test_error_not_a_route_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RouteError, match="not valid JSON"):
        Route.load(tmp_path / "bad.json", FP)
    (tmp_path / "other.json").write_text('{"layers": [1]}')
    with pytest.raises(RouteError, match="not a layerroute route"):
        Route.load(tmp_path / "other.json", FP)


def test_error_unreadable_route_files_name_the_file(tmp_path):
    cases = {
        "bytes.json": (bytes(range(256)) * 2, "bytes.json is not a route file: it is not UTF-8"),
        "empty.json": (b"", "route file .*empty.json is empty"),
        "list.json": (b"[1, 2]", "list.json: not a layerroute route"),
        "version.json": (json.dumps({**Route.identity(FP).to_dict(), "version": "1"}).encode(),
                         "version.json: route format version must be a positive integer, got '1'"),
        "newer.json": (json.dumps({**Route.identity(FP).to_dict(), "version": 9}).encode(),
                       "version 9 is newer than this layerroute"),
        "layers.json": (json.dumps({**Route.identity(FP).to_dict(), "layers": ["0"]}).encode(),
                        "layers.json: route layers must be a list of integers"),
        "model.json": (json.dumps({**Route.identity(FP).to_dict(), "model": {**FP.to_dict(), "num_layers": "30"}})
                       .encode(), "model.json: malformed model fingerprint"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RouteError, match=message):
            Route.load(tmp_path / name, FP)
    with pytest.raises(RouteError, match="route file .*missing.json does not exist"):
        Route.load(tmp_path / "missing.json")
    with pytest.raises(RouteError, match="cannot read route file"):
        Route.load(tmp_path)  # a directory


def test_error_empty_spec_and_syntax_checks_without_a_model(tmp_path):
    from layerroute.route import check_route_arg

    for spec in ("", "  ", "+", " + "):
        with pytest.raises(RouteError, match="empty route spec"):
            Route.parse(spec, FP)
        with pytest.raises(RouteError, match="empty route spec"):
            check_route_arg(spec)
    check_route_arg("skip:40-45+repeat:3x3")  # indices are checked against the model later
    for spec, message in [("skip:5-3", "backwards"), ("jump:3", "unknown route action"), ("skip:-1", "out of range"),
                          ("repeat:2x1", "at least twice"), ("chain:1,2+skip:3", "cannot be combined"),
                          ("skip:0-99999999", "out of range"), ("skip:a", "cannot read")]:
        with pytest.raises(RouteError, match=message):
            check_route_arg(spec)
    Route.identity(FP).save(tmp_path / "ok.json")
    check_route_arg(str(tmp_path / "ok.json"))
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe")
    with pytest.raises(RouteError, match="not UTF-8"):
        check_route_arg(str(tmp_path / "bad.json"))
