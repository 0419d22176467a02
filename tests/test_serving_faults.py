"""Faults and abuse against one real `deltadq serve` (issue 11): every answer is the exact
fine-tune (HF transformers on the `deltadq merge` folder; ids from vLLM's own tokenizer
loader on that folder) or a clear 4xx, and the server keeps serving everyone else.

Base: the qwen2 fixture, whose tokenizers-built tokenizer resolves to Qwen2Tokenizer from
the model type. Fine-tunes are made in seconds from it (tests/finetune_variants.py):
`ext` adds two tokens and changes the chat template, `a` and `b` only change weights; all
compressed with `--method dense`, so served answers must equal the merged folders'.
One engine start for the whole module.
"""

import concurrent.futures as cf
import json
import os
import random
import shutil
import threading
import time

import pytest
import requests

from deltadq_vllm.format.artifact import DATA_FILE
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture
from deltadq_vllm.tools.merge import merge

from finetune_variants import ADDED, TEMPLATE, make_finetune, random_texts
from serving_utils import Server, compare_greedy, hf_greedy

NEW = 6
PROMPTS = ["Q: 12+30=? A:", "<calc>4+4</calc> The cat", "  two  spaces,\nnew line e\u0301 \u4e2d",
           "Q: upper abc A:"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    deltas = root / "deltas"          # --delta-root
    deltas.mkdir()
    base = build_fixture("qwen2")
    fts = {"ext": make_finetune(base, root / "ft-ext", add_tokens=ADDED, seed=1, scale=0.3,
                                chat_template=TEMPLATE),
           "a": make_finetune(base, root / "ft-a", seed=2, scale=0.3),
           "b": make_finetune(base, root / "ft-b", seed=3, scale=0.3)}
    merged, refs = {}, {}
    for name, ft in fts.items():
        compress(base, ft, deltas / name, CompressOptions(method="dense", progress=False))
        merged[name] = root / f"merged-{name}"
        merge(base, deltas / name, merged[name], progress=False)
        refs[name] = hf_greedy(merged[name], PROMPTS, NEW)
    merged["base"], refs["base"] = base, hf_greedy(base, PROMPTS, NEW)
    return {"root": root, "deltas": deltas, "base": base, "merged": merged, "refs": refs,
            "counts": {}}


@pytest.fixture(scope="module")
def server(work):
    spec = ",".join(f"{n}={work['deltas'] / n}" for n in ("ext", "a"))
    s = Server(work["base"], ["--delta-modules", spec, "--max-deltas", "2",
                              "--max-cpu-deltas", "2", "--enable-runtime-deltas",
                              "--delta-root", work["deltas"], "--served-model-name", "base"],
               work["root"])
    yield s
    s.stop()
    print("\nfault/race outcomes:", json.dumps(work["counts"], indent=1))


# ---------------------------------------------------------------------------- helpers


def _complete(server, model, prompt, max_tokens=NEW):
    """(status, token ids or error message)."""
    r = requests.post(server.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": 1, "return_token_ids": True})
    if r.status_code != 200:
        return r.status_code, r.json()["error"]["message"]
    ch = r.json()["choices"][0]
    return 200, (ch["token_ids"], ch["logprobs"]["token_logprobs"])


def _exact(work, ref_name, i, got) -> str | None:
    ids, lps = got
    return compare_greedy(work["refs"][ref_name][i], ids, lps)


def _check_all_exact(server, work, names=("base", "ext", "a")):
    for name in names:
        for i, p in enumerate(PROMPTS):
            status, got = _complete(server, name, p)
            assert status == 200, (name, got, server.tail())
            msg = _exact(work, name, i, got)
            assert msg is None, f"{name} / {p!r}: {msg}"


def _post(server, route, body):
    return requests.post(server.url + route, json=body, timeout=300)


def _load(server, name, path):
    return _post(server, "/v1/load_delta", {"delta_name": name, "delta_path": str(path)})


def _unload(server, name):
    return _post(server, "/v1/unload_delta", {"delta_name": name})


# ------------------------------------------------------------------------------ tests


def test_tokenization_is_vllms_loader_on_the_merged_folder(server, work):
    from vllm.tokenizers.registry import get_tokenizer

    ref = get_tokenizer(str(work["merged"]["ext"]))
    texts = random_texts(random.randrange(1 << 30), 150)
    bad = []
    for t in texts:
        for special in (True, False):
            r = _post(server, "/tokenize", {"model": "ext", "prompt": t,
                                            "add_special_tokens": special})
            assert r.status_code == 200, r.text
            if r.json()["tokens"] != ref.encode(t, add_special_tokens=special):
                bad.append(t)
    assert not bad, bad[:3]
    msgs = [{"role": "user", "content": texts[0]}]
    r = _post(server, "/tokenize", {"model": "ext", "messages": msgs,
                                    "add_generation_prompt": True})
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == ref.encode(text, add_special_tokens=False)
    # the base keeps its own tokenizer: the added tokens are not tokens there
    r = _post(server, "/tokenize", {"model": "base", "prompt": ADDED[0],
                                    "add_special_tokens": False})
    assert len(r.json()["tokens"]) > 1
    _check_all_exact(server, work)
    assert "Error parsing config" not in server.tail(100000)


def test_names_follow_one_rule(server, work):
    for name, needle in (("bad name\n<script>", "invalid fine-tune name"),
                         ("base", "served under"), ("ext", "already served")):
        r = _load(server, name, work["deltas"] / "b")
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert "fix:" in r.json()["error"]["message"]
    _check_all_exact(server, work, ("base",))


def _fresh_copy(work, name, src="b"):
    d = work["deltas"] / name
    shutil.copytree(work["deltas"] / src, d)
    return d


def _evict(server, work):
    """Two other fine-tunes through the 2-entry host cache: a runtime-loaded one leaves it."""
    for name in ("ext", "a"):
        assert _complete(server, name, PROMPTS[0])[0] == 200


@pytest.mark.parametrize("fault", ["delete", "truncate", "bitflip", "symlink"])
def test_file_fault_after_registration_fails_only_that_finetune(server, work, tmp_path, fault):
    name = f"f-{fault}"
    d = _fresh_copy(work, name)
    assert _load(server, name, d).status_code == 200
    status, got = _complete(server, name, PROMPTS[0])
    assert status == 200 and _exact(work, "b", 0, got) is None
    _evict(server, work)
    data = d / DATA_FILE
    if fault == "delete":
        shutil.rmtree(d)
    elif fault == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif fault == "bitflip":
        buf = bytearray(data.read_bytes())
        buf[len(buf) // 3] ^= 0x10
        data.write_bytes(bytes(buf))
    else:   # the resolved path becomes a symlink to another valid delta outside the root
        outside = tmp_path / "outside"
        shutil.copytree(work["deltas"] / "a", outside)
        shutil.rmtree(d)
        os.symlink(outside, d)
    status, msg = _complete(server, name, PROMPTS[0])
    assert status == 409, (status, msg)
    assert name in msg and "fix:" in msg
    work["counts"][f"fault-{fault}"] = {"status": status, "message": msg[:160]}
    _check_all_exact(server, work)          # server alive, others exact
    assert _unload(server, name).status_code == 200


def test_deltas_in_use_survive_file_loss_and_host_cache_pressure(server, work):
    """A long request for a runtime-loaded fine-tune keeps running exactly while its files
    are deleted and other fine-tunes push the 2-entry host cache: it is not evicted (no
    re-read inside a step)."""
    d = _fresh_copy(work, "long")
    assert _load(server, "long", d).status_code == 200
    ref = hf_greedy(work["merged"]["b"], [PROMPTS[3]], 48)[0]
    box = {}
    t = threading.Thread(target=lambda: box.update(r=_complete(server, "long", PROMPTS[3], 48)))
    t.start()
    time.sleep(0.5)
    shutil.rmtree(d)
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda m: _complete(server, m, PROMPTS[0]), ["ext", "a", "base", "ext"]))
    t.join()
    assert all(s == 200 for s, _ in outs), outs
    status, got = box["r"]
    assert status == 200 and compare_greedy(ref, *got) is None, (status, got, server.tail())
    assert _complete(server, "long", PROMPTS[0])[0] == 409   # now refused
    assert _unload(server, "long").status_code == 200
    _check_all_exact(server, work)


def _hammer(server, work, model, ref_name, stop, out, lock):
    rng = random.Random()
    while not stop.is_set():
        i = rng.randrange(len(PROMPTS))
        status, got = _complete(server, model, PROMPTS[i])
        if status == 200:
            kind = "exact" if _exact(work, ref_name, i, got) is None else "WRONG"
        elif status == 404:
            kind = "404"
        else:
            kind = f"{status}: {got[:100]}"
        with lock:
            out[kind] = out.get(kind, 0) + 1


def test_load_window_answers_404_or_the_exact_finetune(server, work):
    """Clients ask for a fine-tune with its own tokenizer while it is loaded and unloaded."""
    d = _fresh_copy(work, "win", src="ext")
    out, lock, stop = {}, threading.Lock(), threading.Event()
    threads = [threading.Thread(target=_hammer, args=(server, work, "win", "ext", stop, out,
                                                      lock)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(1.0)
            assert _load(server, "win", d).status_code == 200
            time.sleep(2.0)
            assert _unload(server, "win").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    work["counts"]["load-window"] = out
    assert set(out) <= {"exact", "404"}, out
    assert out.get("exact", 0) > 0 and out.get("404", 0) > 0, out
    _check_all_exact(server, work)


def test_concurrent_load_unload_of_one_name(server, work):
    """4 threads load/unload one name, 4 clients use it: every answer is a 404 or exact,
    every load/unload answer is a success or a clear conflict."""
    d = _fresh_copy(work, "race", src="ext")
    out, lock, stop = {}, threading.Lock(), threading.Event()
    admin: dict[str, int] = {}

    def churn():
        rng = random.Random()
        while not stop.is_set():
            r = _load(server, "race", d) if rng.random() < 0.5 else _unload(server, "race")
            msg = r.json().get("error", {}).get("message", "") if r.status_code != 200 else ""
            key = f"{r.status_code}" + (" already served" if "already served" in msg else
                                        " not served" if "no fine-tune named" in msg else
                                        f" {msg[:80]}" if msg else "")
            with lock:
                admin[key] = admin.get(key, 0) + 1
            time.sleep(rng.random() * 0.5)   # let the name stay (un)loaded for a while

    threads = [threading.Thread(target=churn) for _ in range(4)]
    threads += [threading.Thread(target=_hammer, args=(server, work, "race", "ext", stop, out,
                                                       lock)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(15)
    stop.set()
    for t in threads:
        t.join()
    _unload(server, "race")
    work["counts"]["load-unload-race"] = {"answers": out, "load/unload": admin}
    assert set(out) <= {"exact", "404"}, out
    assert out.get("exact", 0) > 0, out
    assert set(admin) <= {"200", "400 already served", "404 not served"}, admin
    _check_all_exact(server, work)


def _hf_prompt_logprobs(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_prompt_logprobs_in_mixed_steps_are_each_finetunes_or_refused(server, work):
    """Prompt logprobs while several fine-tunes share the step (issue 11 item 6, the LM-head
    fix is `graph`'s): each request's own fine-tune, or a 400 saying why; never the base's."""
    from vllm.tokenizers.registry import get_tokenizer

    prompt = PROMPTS[1]
    models = ["ext", "a", "base"]
    refs = {}
    for m in models:
        ids = get_tokenizer(str(work["merged"][m])).encode(prompt)
        refs[m] = (ids, _hf_prompt_logprobs(work["merged"][m], ids))

    def ask(m):
        r = requests.post(server.url + "/v1/completions", timeout=120, json={
            "model": m, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 1})
        return m, r.status_code, r.json()

    outcome = {}
    with cf.ThreadPoolExecutor(6) as ex:
        for m, status, body in ex.map(ask, models * 2):
            if status == 400:
                assert "prompt" in body["error"]["message"], body
                outcome[f"{m}: 400"] = outcome.get(f"{m}: 400", 0) + 1
                continue
            assert status == 200, body
            ids, want = refs[m]
            got = body["choices"][0]["prompt_logprobs"]
            served = [got[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
            worst = max(abs(a - b) for a, b in zip(served, want))
            assert worst < 2e-3, (m, worst)
            outcome[f"{m}: exact"] = outcome.get(f"{m}: exact", 0) + 1
    work["counts"]["mixed-step-prompt-logprobs"] = outcome
    _check_all_exact(server, work)
