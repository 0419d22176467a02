"""The offline tuner (python -m deltadq_vllm.kernels.tune) end to end on a CPU: --smoke runs
the real flow (compressor's configs, slot banks, every candidate checked against the
float64 reference, selection, atomic table, --merge-into, --budget-s) through the Triton
interpreter on tiny shapes; its times mean nothing, so only the table's structure and the
launcher's use of it are checked."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import json  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from deltadq_vllm.kernels import tune, tuning  # noqa: E402


@pytest.mark.slow
def test_smoke_tune_writes_a_table_the_launcher_reads(tmp_path, monkeypatch):
    out, merged = tmp_path / "run.json", tmp_path / "configs" / "cpu.json"
    assert tune.main(["--smoke", "--out", str(out), "--ratios", "16", "--tokens", "1",
                      "--merge-into", str(merged)]) == 0
    table = json.loads(out.read_text())
    assert table["gpu"] == "cpu-interpreter" and table["complete"] is True
    assert table["units_done"] == table["units_total"] == 2      # 2 shapes x t=1 decode
    for key, entry in table["entries"].items():
        assert key.startswith("decode|") and "|t=1|" in key
        cfg = tuning.KernelConfig.from_dict("decode", entry["config"])
        timed = [c["config"] for c in entry["candidates"]]
        assert entry["config"] in timed and not entry["rejected"]
        assert {c["variant"] for c in timed} == set(tuning.TUNE_VARIANTS["decode"])
        assert all(0 < c["err_over_bound"]["16"] <= 1 for c in entry["candidates"])
        assert cfg.block("BLOCK_M") == 1
    assert json.loads(merged.read_text())["entries"].keys() == table["entries"].keys()
    # the launcher's lookup resolves those buckets from the table
    monkeypatch.setenv(tuning.ENV_VAR, str(merged.parent))
    tuning.reload_tables()
    try:
        for key, entry in table["entries"].items():
            k = tuning.parse_key(key)
            c = tuning.lookup("cpu-interpreter", (0, 0), "decode", k["in"], k["rows"], k["t"],
                              k["kp"], bool(k["s"]), k["dtype"])
            assert c.to_json() == entry["config"] and c.source == "table:cpu-interpreter"
    finally:
        monkeypatch.delenv(tuning.ENV_VAR)
        tuning.reload_tables()


def test_budget_stops_and_still_writes(tmp_path):
    out = tmp_path / "t.json"
    assert tune.main(["--smoke", "--out", str(out), "--budget-s", "0"]) == 0
    table = json.loads(out.read_text())
    assert table["complete"] is False and table["units_done"] == 0 and table["entries"] == {}


def test_select_uses_finished_ratios_only():
    entry = {"complete_ratios": ["16", "64"], "candidates": [
        {"config": "a", "us": {"16": 10.0, "64": 4.0}},
        {"config": "b", "us": {"16": 9.0, "64": 5.0}},     # 0.9x and 1.25x of a: worse
        {"config": "c", "us": {"16": 1.0}},                # not timed at 64: out
        {"config": "d", "us": {"16": 10.2, "64": 3.0, "128": 0.1}}]}  # 128 unfinished
    assert tune.select(entry)["config"] == "d"
    entry["candidates"][3]["us"]["64"] = 4.5
    assert tune.select(entry)["config"] == "a"
    assert tune.select({"candidates": entry["candidates"]}) is None


def test_merge_refuses_another_gpu(tmp_path):
    p = tmp_path / "t.json"
    tune.write_atomic(p, {"version": tuning.TABLE_VERSION, "gpu": "NVIDIA H100", "entries": {}})
    with pytest.raises(SystemExit, match="H100"):
        tune.merge_into(p, {"version": tuning.TABLE_VERSION, "gpu": "NVIDIA H200", "entries": {}})


def test_shipped_tables_are_measured_and_valid():
    """Every table shipped in kernels/configs was written by the tuner on a real GPU: it
    names the GPU and versions, every entry's config is a valid launch config for its
    bucket, carries the measured times of the candidates it beat, and the launcher finds
    it for that GPU (no invented entries)."""
    files = sorted(tuning.CONFIG_DIR.glob("*.json"))
    assert files, "no shipped kernel table"
    for f in files:
        t = json.loads(f.read_text())
        assert t["version"] == tuning.TABLE_VERSION and t["gpu"] and t["triton"] and t["torch"]
        assert t["entries"], f
        for key, entry in t["entries"].items():
            b = tuning.parse_key(key)
            cfg = tuning.KernelConfig.from_dict(b["path"], entry["config"])
            timed = [c for c in entry["candidates"] if c["config"] == entry["config"]]
            assert timed and all(us > 0 for us in timed[0]["us"].values()), key
            assert tune.select(entry)["config"] == entry["config"], key   # the tuner's choice
            hit = tuning.lookup(t["gpu"], tuple(t["capability"]), b["path"], b["in"], b["rows"],
                                b["t"], b.get("kp", 32) or 32, bool(b["s"]), b["dtype"])
            assert hit.source.startswith("table:") and hit == cfg.__class__(
                cfg.path, cfg.variant, cfg.blocks, cfg.num_warps, cfg.num_stages, hit.source), key
