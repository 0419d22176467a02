"""Real layer inputs of the base model on a calibration text, captured layer by layer.

The base is never loaded whole: the model is built on the `meta` device, and each
decoder layer is materialised from the checkpoint, run on the hidden states of the
previous one (with hooks recording every nn.Linear's input), then dropped. Peak
memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import re
import warnings
from importlib import resources
from pathlib import Path

import torch

from deltadq_vllm.checkpoint import Checkpoint, release_freed_memory
from deltadq_vllm.errors import DeltaDQError

LAYER_RE = re.compile(r"^(.*\.layers)\.(\d+)\.")


def default_text() -> str:
    return resources.files("deltadq_vllm.tools").joinpath("data/calibration.txt").read_text()


def read_calibration_text(path: str | None) -> tuple[str, str]:
    """(text, source description)."""
    if path is None:
        return default_text(), "builtin:calibration.txt"
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeltaDQError(f"cannot read calibration file {p}: {e}",
                           "pass a readable UTF-8 text file to --calibration") from None
    if not text.strip():
        raise DeltaDQError(f"calibration file {p} is empty", "pass a file with some real text")
    return text, str(p)


class CalibrationUnavailable(Exception):
    pass


def checkpoint_rows(ckpt: Checkpoint, name: str, ids: torch.Tensor) -> torch.Tensor:
    """`ckpt`'s matrix `name` at rows `ids` (any shape: the result is [*ids.shape, cols]),
    in its stored dtype, reading only the distinct rows' bytes."""
    uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)
    rows = ckpt.get_rows(name, uniq.tolist())
    return rows[inv].reshape(*ids.shape, rows.shape[-1])


class WeightSource:
    """A model's weights for the layer-wise runner: `source(name)` is the float32 tensor,
    `source.rows(name, ids)` the float32 rows of a matrix at `ids` ([*ids.shape, cols]),
    which a source can read without materialising the matrix (the embedding's lookups)."""

    def __init__(self, get, rows):
        self._get, self.rows = get, rows

    def __call__(self, name: str) -> torch.Tensor:
        return self._get(name)


def checkpoint_source(ckpt: Checkpoint) -> WeightSource:
    """`ckpt`'s weights in float32 (rows read on their own)."""
    return WeightSource(lambda n: ckpt.get(n).float(),
                        lambda n, ids: checkpoint_rows(ckpt, n, ids).float())


class LayerwiseCalibrator:
    """Feeds calibration tokens through the base one decoder layer at a time."""

    def __init__(self, base: Checkpoint, text: str, n_seqs: int = 8, seq_len: int = 128,
                 max_rows: int = 1024, seed: int = 0):
        try:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a dependency
            raise CalibrationUnavailable(str(e))
        self.base = base
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        try:
            tok = AutoTokenizer.from_pretrained(base.path)
        except Exception as e:
            raise CalibrationUnavailable(f"base has no usable tokenizer ({e})")
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # chunked below: no length warning
        n = min(n_seqs, len(ids) // seq_len) if len(ids) >= seq_len else 1
        length = seq_len if len(ids) >= seq_len else len(ids)
        if length < 2:
            raise CalibrationUnavailable("calibration text is too short")
        # n windows spread evenly over the whole text (a long --calibration file is read
        # throughout, not only its first n * length tokens)
        starts = [round(i * (len(ids) - length) / (n - 1)) if n > 1 else 0 for i in range(n)]
        self.input_ids = torch.tensor([ids[a:a + length] for a in starts]).view(n, length)
        self.n_tokens = n * length
        try:
            config = AutoConfig.from_pretrained(base.path)
            config._attn_implementation = "sdpa"
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            self.inner = self.model.model
            self.layers = self.inner.layers
            self.rotary = type(self.inner.rotary_emb)(config=config)
        except Exception as e:
            raise CalibrationUnavailable(f"unsupported architecture for calibration ({e})")
        self.prefix = self._layers_prefix()
        # Gemma and Gemma 2 scale the embedding rows by sqrt(hidden) in the model's forward
        # (not in a module this runner calls); their logits are soft-capped likewise
        gemma = getattr(config, "model_type", "") in ("gemma", "gemma2")
        self.input_scale = float(config.hidden_size) ** 0.5 if gemma else None
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        self.hidden = None
        self.next_index = 0
        self._last: dict[str, torch.Tensor] = {}
        self._final: torch.Tensor | None = None

    def _layers_prefix(self) -> str:
        for name, mod in self.model.named_modules():
            if mod is self.layers:
                return name
        raise CalibrationUnavailable("cannot locate the decoder layers")

    def _module_name(self, module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise CalibrationUnavailable("module not found")

    def _materialize(self, module, prefix: str, recurse: bool = True, source=None) -> None:
        """Fill the module's (meta) parameters from the checkpoint (or `source`, a
        callable name -> tensor), one tensor at a time: each is read and converted
        straight into its parameter, so no second float32 copy (a state dict for
        load_state_dict) is ever resident. recurse=False: only the module's own
        parameters and persistent buffers, not its children's."""
        get = source if source is not None else self.base.get
        module.to_empty(device="cpu", recurse=recurse)
        if recurse:
            own = module.state_dict(keep_vars=True)
        else:
            own = dict(module.named_parameters(recurse=False))
            own.update((n, b) for n, b in module.named_buffers(recurse=False)
                       if n not in module._non_persistent_buffers_set)
        with torch.no_grad():
            for k, t in own.items():
                w = get(f"{prefix}.{k}")
                if w.shape != t.shape:
                    raise CalibrationUnavailable(f"{prefix}.{k} has shape {list(w.shape)}, the "
                                                 f"model config implies {list(t.shape)}")
                t.copy_(w)

    def token_rows(self) -> torch.Tensor:
        """Token ids seen in calibration (the rows of the embedding that matter)."""
        return self.input_ids.unique()

    def embedding_name(self) -> str:
        return self._module_name(self.model.get_input_embeddings()) + ".weight"

    def embed(self, source=None) -> torch.Tensor:
        """Hidden states entering the first layer (the embedding rows of the tokens). Only
        the tokens' rows are read where the weights allow it (the checkpoint's own, or a
        `WeightSource`'s `rows`): a float32 copy of a 32000 x 4096 table is 0.5 GB for the
        ~1000 rows a calibration or check text uses."""
        name = self.embedding_name()
        if source is None:
            rows = checkpoint_rows(self.base, name, self.input_ids).float()
        elif hasattr(source, "rows"):
            rows = source.rows(name, self.input_ids)
        else:
            rows = source(name)[self.input_ids].float()
        return rows * self.input_scale if self.input_scale is not None else rows

    def start(self) -> None:
        self.hidden = self.embed()
        self._positions()

    def _positions(self) -> None:
        """Position ids, rotary embeddings and the causal mask of the sequences (once)."""
        if hasattr(self, "mask"):
            return
        seq = self.input_ids.shape[1]
        pos = torch.arange(seq).unsqueeze(0)
        # (the rotary module reads only its input's dtype and device: float32 on the CPU)
        self.position_embeddings = self.rotary(torch.empty(0), position_ids=pos)
        self.position_ids = pos
        mask = torch.full((seq, seq), float("-inf")).triu(1)
        self.mask = mask.view(1, 1, seq, seq)

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in]: every token's row, or max_rows of them drawn at random, in sequence
        order (the held-out split keeps whole passages: hold_block)."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > self.max_rows:
            idx = torch.randperm(flat.shape[0], generator=self.gen)[: self.max_rows]
            flat = flat[idx.sort().values]
        return flat.detach().clone()

    @property
    def hold_block(self) -> int:
        """Consecutive sampled rows that come from one sequence (Calibration.split holds
        whole sequences out); 1 (token by token) with fewer sequences than the split's
        share needs."""
        from .measure import HOLD_EVERY
        n_seqs = self.input_ids.shape[0]
        if n_seqs < HOLD_EVERY:
            return 1
        return max(1, min(self.n_tokens, self.max_rows) // n_seqs)

    def inputs_for_layer(self, index: int) -> dict[str, torch.Tensor]:
        """Inputs of every linear in layer `index` ({checkpoint weight name: [N, in]}).

        Layers are visited in order; asking for a later layer runs the ones between.
        """
        if index < self.next_index - 1:
            raise ValueError("layers must be calibrated in increasing order")
        while self.next_index <= index:
            release_freed_memory()
            self._last = self._run_layer(self.next_index)
            self.next_index += 1
        return self._last

    def _run_layer(self, index: int) -> dict[str, torch.Tensor]:
        if self.hidden is None:
            self.start()
        captured: dict[str, torch.Tensor] = {}
        seen: dict[int, tuple] = {}  # id(input) -> (input, its sample): q/k/v, gate/up share it

        def capture(key, x):
            if id(x) not in seen:  # (holding x keeps its id from being reused meanwhile)
                seen[id(x)] = (x, self._sample(x))
            captured[key] = seen[id(x)][1]

        self.hidden = self.forward_layer(index, self.hidden, capture=capture)
        return captured

    def forward_layer(self, index: int, hidden: torch.Tensor, source=None,
                      capture=None) -> torch.Tensor:
        """Decoder layer `index` applied to `hidden`, its weights read from the checkpoint
        (or `source`: name -> tensor); capture(weight name, input) sees every linear's input."""
        self._positions()   # (not start(): the check runs streams of its own, no embedding)
        layer = self.layers[index]
        prefix = f"{self.prefix}.{index}"
        hooks = []

        def load_linear(m, args, key, path):
            if capture is not None:
                capture(key, args[0])
            self._materialize(m, path, source=source)

        def release(m, args, out):
            m.to_empty(device="meta")  # (a hook returning non-None would replace `out`)

        # The linears (nearly all of a layer's bytes) are materialised just before they
        # run and released right after: one float32 matrix resident instead of the
        # whole layer's (same weights, same arithmetic). The rest (norms) up front.
        for name, mod in layer.named_modules():
            path = f"{prefix}.{name}" if name else prefix
            if isinstance(mod, torch.nn.Linear):
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, key=f"{path}.weight", path=path: load_linear(m, args, key,
                                                                                path)))
                hooks.append(mod.register_forward_hook(release))
            elif not any(isinstance(p, torch.nn.Linear) for p in _parents(layer, name)):
                self._materialize(mod, path, recurse=False, source=source)
        try:
            with torch.no_grad():
                out = layer(hidden, attention_mask=self.mask, position_ids=self.position_ids,
                            position_embeddings=self.position_embeddings)
        finally:
            for h in hooks:
                h.remove()
            layer.to_empty(device="meta")  # release the layer's weights
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor, source=None) -> torch.Tensor:
        """The final norm (the LM head's input) applied to the last layer's output."""
        norm = self.inner.norm
        self._materialize(norm, self._module_name(norm), source=source)
        try:
            with torch.no_grad():
                return norm(hidden)
        finally:
            norm.to_empty(device="meta")

    def final_inputs(self) -> torch.Tensor:
        """Inputs of the LM head: the final norm applied to the last hidden states.

        May be asked before the layers' inputs (a tied embedding is compressed first, so
        that the bytes its discrete configurations leave flow to the layers): the walk to
        the end is then a look-ahead, and the walker is put back where it was, with its
        sampling generator, so the layers' inputs and these rows are the ones an in-order
        walk gives. Costs one more forward pass of the model on the calibration text."""
        if self._final is None:
            back = (self.hidden, self.next_index, self._last, self.gen.get_state())
            self.inputs_for_layer(len(self.layers) - 1)
            self._final = self._sample(self.final_norm(self.hidden))
            if back[1] < len(self.layers):   # a look-ahead: rewind
                self.hidden, self.next_index, self._last = back[:3]
                self.gen.set_state(back[3])
        return self._final


def known_final(calibrator) -> torch.Tensor | None:
    """The LM head's inputs a calibrator has computed so far (None: not yet)."""
    return getattr(calibrator, "_final", None)


def preset_final(calibrator, final: torch.Tensor) -> None:
    """Hand a calibrator the LM head's inputs an identical one computed (an earlier pass
    of the same compress(): same model, text, sampling), so asking for them early costs
    no look-ahead walk. Equal to what it would compute: the look-ahead rewinds the walker
    and its sampling generator, so no layer's inputs depend on whether it ran."""
    calibrator._final = final


class RecordingCalibrator:
    """A LayerwiseCalibrator whose captures are kept, so compressing many fine-tunes of
    the same base (benchmarks, sweeps over methods and ratios) calibrates it only once.
    Holds every layer's inputs: about 4 distinct x 1024 x hidden floats per layer."""

    def __init__(self, live: LayerwiseCalibrator):
        self.live = live
        self.n_tokens = live.n_tokens
        self._layers: dict[int, dict[str, torch.Tensor]] = {}
        self._final = None
        self._rows = None

    def inputs_for_layer(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._layers:
            self._layers[index] = self.live.inputs_for_layer(index)
        return self._layers[index]

    def token_rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self.live.token_rows()
        return self._rows

    def final_inputs(self) -> torch.Tensor:
        if self._final is None:
            self._final = self.live.final_inputs()
        return self._final

    @property
    def hold_block(self) -> int:
        return self.live.hold_block


_RECORDED: dict[tuple, RecordingCalibrator] = {}


def make_calibrator(base: Checkpoint, text: str, reuse: bool = False,
                    **kw) -> LayerwiseCalibrator | RecordingCalibrator | None:
    """The base's calibrator; with reuse=True the one recorded by an earlier call in this
    process for the same base weights, text and sampling (only the last base is kept)."""
    key = None
    if reuse:
        import hashlib

        key = (str(base.path), base.fingerprint()["digest"],
               hashlib.sha256(text.encode()).hexdigest(), tuple(sorted(kw.items())))
        if key in _RECORDED:
            return _RECORDED[key]
    try:
        cal = LayerwiseCalibrator(base, text, **kw)
    except CalibrationUnavailable as e:
        warnings.warn(f"calibration unavailable, falling back to weight-space error: {e}")
        return None
    if reuse:
        _RECORDED.clear()
        cal = _RECORDED[key] = RecordingCalibrator(cal)
    return cal


def _parents(root, name: str):
    """The modules above `name` (dotted path below root), root excluded."""
    parts = name.split(".") if name else []
    mod = root
    for part in parts[:-1]:
        mod = getattr(mod, part)
        yield mod


def layer_index(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(2)) if m else None
