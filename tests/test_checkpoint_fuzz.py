"""Damaged and edited checkpoints: each is refused in one line, or loads a model identical to the saved one.

Real tiny checkpoints (int4 g16, NF4, 2:4 sparse, W8A8) are truncated, bit-flipped, and have their
manifest and safetensors header edited. A checkpoint written by this slimlm is sealed (sha256 of the
tensors in the manifest, the manifest's digest in the tensors' metadata), so no mutation may load a
different model. An unsealed (older) checkpoint is checked too, to exercise the structural checks
that the seal would otherwise hide; there a change the structure cannot reveal (a flipped bit in a
float, a dtype edit, a type whose tensors happen to fit) may load, and only those.
"""

import json
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.io import INDEX, MANIFEST, WEIGHTS, ShardWriter, load_compressed, save_compressed
from slimlm.models.integrity import SHA256
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.prune import NM, Magnitude
from slimlm.quant import RTN
from slimlm.quant.w8a8 import W8A8

IDS = torch.arange(3, 35).reshape(1, 32)
CONFIGS = {"int4-g16": RTN(scheme="int4-g16"), "nf4": RTN(scheme="nf4"),
           "sparse-2:4": Magnitude(sparsity=0.5, pattern=NM(2, 4)), "w8a8": W8A8()}  # fmt: skip
RUNTIME_TYPES = ("QuantLinear", "W8A8Linear", "W8A8PerTensorLinear", "SparseLinear", "SparseQuantLinear",
                 "OutlierLinear", "NoSuchLinear")  # fmt: skip
# what only a checksum can catch: the structure is intact, the numbers are not
UNDETECTABLE_UNSEALED = ("flip data", "manifest dtype=float16", "type ")
# refusals of an unsealed checkpoint that must name the precise fault (the seal would refuse them all alike)
NAMED = {("int4-g16", "scheme bits=3"): "q_proj.codes: expected torch.uint8 (64, 24) for IntScheme(bits=3",
         ("w8a8", "scheme bits=3"): "unusable (W8A8 weights are IntScheme(bits=8",
         ("sparse-2:4", "entry out_features=63"): "N:M index has shape (64, 8); a 63x64 weight at 2:4 needs (63, 8)",
         ("sparse-2:4", "header pattern shape=[2, 1]"): "sparse pattern has shape (2, 1)",
         ("int4-g16", "type SparseLinear"): "SparseLinear cannot be built from keys",
         ("int4-g16", "entry in_features=0"): "in_features must be a positive int",
         ("int4-g16", "module added a.b.c"): "the manifest names module 'a.b.c', which this model does not have"}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _header(raw: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, header: dict) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def _unseal(folder):
    """What an older slimlm wrote: no sha256 in the manifest, no manifest digest in the tensors."""
    save_file(load_file(str(folder / WEIGHTS)), str(folder / WEIGHTS), metadata={"format": "slimlm.checkpoint/1"})
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest[SHA256]
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(name, sealed): (folder, logits of the model that was saved)}."""
    root, out = tmp_path_factory.mktemp("ckpt"), {}
    for name, config in CONFIGS.items():
        model = apply(tiny_model("llama"), config)
        sealed = save_compressed(model, tiny_tokenizer(), root / f"{name}-sealed")
        unsealed = shutil.copytree(sealed, root / f"{name}-unsealed")
        _unseal(unsealed)
        out[name, True], out[name, False] = (sealed, _logits(model)), (unsealed, _logits(model))
    return out


def _weight_mutations(raw: bytes, module: str, rng: random.Random) -> dict[str, bytes]:
    n, header = _header(raw)
    data = 8 + n
    muts = {f"truncate at {off}": raw[:off] for off in (0, 5, 8, 8 + n // 2, data, data + 64, len(raw) - 1)}
    for where, lo, hi in (("header", 0, data), ("data", data, len(raw))):
        for pos in sorted(rng.sample(range(lo, hi), 4)):
            flipped = bytearray(raw)
            flipped[pos] ^= 1 << rng.randrange(8)
            muts[f"flip {where} byte {pos}"] = bytes(flipped)
    for key in (k for k in header if k.startswith(module + ".")):
        spec = header[key]
        start, end = spec["data_offsets"]
        for field, value in (("dtype", "F16" if spec["dtype"] != "F16" else "U8"), ("dtype", "I32"),
                             ("shape", [d + 1 for d in spec["shape"]] or [2]), ("shape", [*spec["shape"][::-1], 1]),
                             ("data_offsets", [start, end - 1]), ("data_offsets", [start + 1, end + 1])):  # fmt: skip
            edited = json.loads(json.dumps(header))
            edited[key][field] = value
            muts[f"header {key.rsplit('.', 1)[1]} {field}={value}"] = _with_header(raw, edited)
    return muts


def _edit(manifest: dict, fn) -> str:
    edited = json.loads(json.dumps(manifest))
    fn(edited)
    return json.dumps(edited)


def _manifest_mutations(manifest: dict, module: str) -> dict[str, str]:
    entry = manifest["modules"][module]

    def entry_set(key, value):
        return lambda m: m["modules"][module].__setitem__(key, value)

    muts = {f"type {t}": _edit(manifest, entry_set("type", t)) for t in RUNTIME_TYPES if t != entry["type"]}
    for key, value in (("in_features", 65), ("in_features", 0), ("in_features", -4), ("in_features", "64"),
                       ("out_features", 63), ("bias", True), ("bias", "no"), ("rank", 3)):  # fmt: skip
        muts[f"entry {key}={value!r}"] = _edit(manifest, entry_set(key, value))
    for key in ("type", "in_features", "out_features", "bias", "scheme"):
        muts[f"entry without {key}"] = _edit(manifest, lambda m, key=key: m["modules"][module].pop(key, None))
    scheme = entry.get("scheme")
    for key, value in scheme.items() if isinstance(scheme, dict) else ():
        for new in (3, "x", None):
            muts[f"scheme {key}={new!r}"] = _edit(manifest, lambda m, k=key, v=new: m["modules"][module]["scheme"]
                                                  .__setitem__(k, v))  # fmt: skip
    muts["scheme int3-g16"] = _edit(manifest, entry_set("scheme", "int3-g16"))
    muts["module dropped"] = _edit(manifest, lambda m: m["modules"].pop(module))
    for other in ("lm_head", "model.norm", "model.no_such", "a.b.c"):
        muts[f"module added {other}"] = _edit(manifest, lambda m, o=other: m["modules"].__setitem__(o, entry))
    muts["entry not a mapping"] = _edit(manifest, lambda m: m["modules"].__setitem__(module, 3))
    muts["modules a list"] = _edit(manifest, lambda m: m.__setitem__("modules", [entry]))
    muts["modules missing"] = _edit(manifest, lambda m: m.pop("modules"))
    muts["manifest dtype=int77"] = _edit(manifest, lambda m: m.__setitem__("dtype", "int77"))
    muts["manifest dtype=float16"] = _edit(manifest, lambda m: m.__setitem__("dtype", "float16"))
    muts["manifest a list"] = "[1, 2]"
    muts["manifest not json"] = '{"format": '
    return muts


def _outcome(folder, reference) -> str:
    """'same', 'different' or the refusal's message; anything but a one-line SlimlmError fails the test."""
    try:
        model, _ = load_compressed(folder)
    except SlimlmError as e:
        assert "\n" not in str(e) and str(e) not in ("same", "different"), str(e)
        return str(e)
    return "same" if torch.equal(_logits(model), reference) else "different"


# unsealed NF4 is left out for time: it loads through the same QuantLinear code as int4
@pytest.mark.parametrize("name, sealed", [(name, True) for name in CONFIGS] +
                         [(name, False) for name in CONFIGS if name != "nf4"],
                         ids=lambda v: {True: "sealed", False: "unsealed"}.get(v, v))  # fmt: skip
def test_every_mutation_is_refused_in_one_line_or_loads_the_same_model(tmp_path, checkpoints, name, sealed):
    src, reference = checkpoints[name, sealed]
    assert _outcome(src, reference) == "same"  # the unmutated checkpoint (an unsealed one: an older slimlm's)
    manifest = json.loads((src / MANIFEST).read_text())
    module = next(iter(manifest["modules"]))
    raw = (src / WEIGHTS).read_bytes()
    mutations = {**{k: (WEIGHTS, v) for k, v in _weight_mutations(raw, module, random.Random(name)).items()},
                 **{k: (MANIFEST, v) for k, v in _manifest_mutations(manifest, module).items()}}  # fmt: skip
    wrong = {}
    for label, (file, content) in mutations.items():
        folder = shutil.copytree(src, tmp_path / "x", dirs_exist_ok=True)
        (folder / file).write_bytes(content.encode() if isinstance(content, str) else content)
        try:
            outcome = _outcome(folder, reference)
        except (AssertionError, SlimlmError):
            raise
        except Exception as e:  # a crash: what the CLI's last-resort handler would print, not a refusal
            pytest.fail(f"{name} {label}: {type(e).__name__}: {e}")
        if outcome == "different":
            wrong[label] = outcome
        if not sealed and (name, label) in NAMED:
            assert NAMED[name, label] in outcome, (label, outcome)
    if sealed:
        assert not wrong, f"{name}: loaded a different model from {sorted(wrong)}"
    else:
        assert all(label.startswith(UNDETECTABLE_UNSEALED) for label in wrong), sorted(wrong)


def test_a_sharded_checkpoint_is_sealed_too(tmp_path):
    model = apply(tiny_model("llama"), RTN(scheme="int4-g16"))
    blocks = model.model.layers
    writer = ShardWriter(tmp_path / "c", blocks_prefix="model.layers", n_blocks=len(blocks))
    (tmp_path / "c").mkdir()
    for i, block in enumerate(blocks):
        writer.write_block(i, block)
    writer.finish(model, tiny_tokenizer())
    out, reference = tmp_path / "c", _logits(model)
    assert (out / INDEX).is_file() and _outcome(out, reference) == "same"
    manifest_text = (out / MANIFEST).read_text()
    for shard in sorted(json.loads(manifest_text)[SHA256]):
        raw = (out / shard).read_bytes()
        flipped = bytearray(raw)
        flipped[-3] ^= 0x10  # inside the last tensor's data: the file still parses
        (out / shard).write_bytes(bytes(flipped))
        with pytest.raises(SlimlmError, match="it does not match its manifest's sha256"):
            load_compressed(out)
        (out / shard).write_bytes(raw)
    manifest = json.loads(manifest_text)
    module = next(iter(manifest["modules"]))
    (out / MANIFEST).write_text(_edit(manifest, lambda m: m["modules"][module]["scheme"].__setitem__("bits", 3)))
    with pytest.raises(SlimlmError, match="manifest was changed after its tensors were written"):
        load_compressed(out)
