"""The benchmark machinery: shapes, bytes, the interleaved timer, peers (including a missing
one, which must be skipped rather than fail), the CLI's JSON/PNG/Markdown, cold start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import peers as peers_mod
from bench.cases import Case, bytes_moved, interleaved, make_data, parse_shape, parse_shapes


def test_parse_shape_and_axis():
    assert parse_shape("1024x4096") == ((1024, 4096), 1)
    assert parse_shape("32,64,56,56") == ((32, 64, 56, 56), 1)
    assert parse_shape("(32, 56, 56, 64):-1") == ((32, 56, 56, 64), -1)
    assert parse_shapes("32x256; 8x256x28x28 32x56x56x64:-1")[2] == ((32, 56, 56, 64), -1)
    for bad in ("", "12", "3x0", "4x5:7"):
        with pytest.raises(ValueError):
            parse_shape(bad)


def test_case_ids_and_bytes():
    c = Case((32, 56, 56, 64), "f32", axis=-1)
    assert c.id == "nhwc-32x56x56x64-f32" and c.channels == 64
    assert Case((32, 64, 56, 56)).id == "nchw-32x64x56x56-f32"
    assert Case((8192, 4096), "float64").id == "fc-8192x4096-f64"
    assert bytes_moved(Case((1024, 4096)), "forward") == 3 * 1024 * 4096 * 4
    assert bytes_moved(Case((1024, 4096)), "backward") == 5 * 1024 * 4096 * 4
    assert Case.from_dict(c.to_dict()) == c


def test_make_data_is_seeded_and_typed():
    a, b = make_data(Case((16, 8), "float32"), 3), make_data(Case((16, 8), "float32"), 3)
    assert np.array_equal(a.x, b.x) and a.x.dtype == np.float32 and a.gamma.shape == (8,)


def test_interleaved_round_robin_and_budget():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    r = interleaved(fns, 6, numbers={"a": 1, "b": 1})
    assert len(r["a"]["times"]) == len(r["b"]["times"]) == 6
    # Order alternates a b b a a b ... so each neighbours the other on both sides.
    assert calls[:6] == ["a", "b", "b", "a", "a", "b"]
    # A zero budget stops a callable after min_repeats; the other goes on.
    r = interleaved(fns, 8, numbers={"a": 1, "b": 1}, min_repeats=2,
                    budget_s={"a": None, "b": 0.0})
    assert len(r["a"]["times"]) == 8 and len(r["b"]["times"]) == 2


def test_missing_peer_is_skipped_not_failed(monkeypatch):
    monkeypatch.setitem(peers_mod._PEERS, "ghost", (peers_mod.NumpyPeer, "no_such_module_xyz"))
    ok, skipped = peers_mod.available_peers(["fastbn", "ghost"])
    assert ok == ["fastbn"]
    assert "not installed" in skipped["ghost"]


@pytest.mark.parametrize("case", [Case((64, 16)), Case((4, 6, 5, 5), "float64"),
                                  Case((4, 5, 5, 6), axis=-1)], ids=str)
def test_every_available_peer_matches_reference(case):
    data = make_data(case)
    exact = peers_mod.exact_outputs(data)
    names, _ = peers_mod.available_peers()
    for name in names:
        peer = peers_mod.make_peer(name, data)
        peers_mod.check_peer(peer, exact)
        for op in ("fwdbwd", "forward", "backward", "inference"):
            fn = peer.op(op)
            if fn is not None:
                fn()


def test_cli_writes_json_png_markdown(tmp_path, capsys):
    from bench import cli

    paths = {k: tmp_path / f"r.{k}" for k in ("json", "png", "md")}
    rc = cli.main(["--shapes", "64x16 4x6x5x5 4x5x5x6:-1", "--dtypes", "float32,float64",
                   "--peers", "fastbn,numpy,graph", "--repeats", "3", "--no-cold-start",
                   "--stream-elements", str(1 << 20), "--plain",
                   "--json", str(paths["json"]), "--png", str(paths["png"]),
                   "--markdown", str(paths["md"])])
    assert rc == 0
    out = capsys.readouterr().out
    assert "forward+backward: median time per peer" in out
    doc = json.loads(paths["json"].read_text())
    meta = doc["meta"]
    for key in ("cpu", "numba_threads", "threading_layer", "date", "versions"):
        assert key in meta
    assert meta["versions"]["numpy"] and meta["versions"]["numba"]
    assert doc["stream"]["gbps"] > 0
    assert len(doc["cases"]) == 6
    first = doc["cases"][0]
    assert set(first["timings"]) == {"fwdbwd", "forward", "backward", "inference"}
    assert len(first["timings"]["fwdbwd"]["fastbn"]["times"]) == 3
    assert first["speedup"]["fwdbwd"]["numpy"] > 0
    assert 0 < first["pct_stream"]["forward"]
    assert "| case |" in paths["md"].read_text()
    pytest.importorskip("matplotlib")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cold_start_warm_and_empty_cache():
    from bench.cold_start import measure_cold_start

    r = measure_cold_start(runs=1, shape=(8, 4, 3, 3), include_no_cache=False)
    warm, empty = r["warm_cache"], r["empty_cache"]
    assert 0 < warm["import_s"] and 0 < warm["first_call_s"]
    # An empty cache compiles; a warm one only loads.
    assert empty["first_call_s"] > warm["first_call_s"]


def test_threading_layers_table_medians_and_ratios():
    from bench.threading_layers import table

    rounds = {"omp": [{"(4, 8) float32|forward": 1.0e-5}, {"(4, 8) float32|forward": 3.0e-5},
                      {"(4, 8) float32|forward": 2.0e-5}],
              "tbb": [{"(4, 8) float32|forward": 5.0e-5}, {"(4, 8) float32|forward": 3.0e-5},
                      {"(4, 8) float32|forward": 4.0e-5}]}
    text = table(["omp", "tbb"], rounds)
    row = next(ln for ln in text.splitlines() if ln.startswith("| (4, 8)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # medians 20 us and 40 us: ratio 2.00; spreads 3.00 (omp) and 1.67 (tbb)
    assert cells == ["(4, 8) float32", "forward", "20.0 µs", "40.0 µs", "2.00", "3.00 / 1.67"]
    assert "tbb/omp (time ratio, > 1 means tbb is slower): min 2.00, median 2.00" in text


@pytest.mark.slow
def test_threading_layers_runs_each_layer_in_its_own_process(tmp_path):
    """The workers really load the requested layers (an unknown one is skipped, not fatal)."""
    import subprocess
    import sys

    from bench.threading_layers import ROOT

    md = tmp_path / "layers.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.threading_layers", "--shapes", "4x8", "--ops", "forward",
         "--runs", "1", "--repeats", "3", "--layers", "workqueue,tbb,no-such-layer",
         "--markdown", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "no-such-layer skipped" in out
    assert "round 1/1 workqueue" in out and "round 1/1 tbb" in out
    assert "| (4, 8) float32 | forward |" in md.read_text()


@pytest.mark.parametrize("module", ["cli", "perf_gate", "perf_compare", "threading_layers",
                                    "cold_start", "bandwidth"])
def test_bench_help_texts_render(module, capsys):
    """--help formats every help string (a bare '%' in one made perf_gate's crash)."""
    import importlib

    main = importlib.import_module(f"bench.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
