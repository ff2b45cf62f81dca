"""Sweep folders for the report's tests, written in the layout `slimlm sweep` writes
(/work/briefs/sweep-layout.md: sweep.json, base/, jobs/<id>/) from real Result objects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slimlm.eval.quality import Quality
from slimlm.eval.result import Result, environment
from slimlm.eval.speed import Speed
from slimlm.models.size import SizeReport

PROMPTS = ("The history of the city", "In mathematics, a group is", "The river flows")
BASE_TEXTS = (" began in the tenth century.", " a set with an operation.", " north to the sea.")


def make_result(*, ppl: float, kld: float | None, bpw: float, mb: float, tps: float | None = 20.0,
                protocol: str = "wiki-v1", model: str = "tiny", threads: int = 1) -> Result:
    quality = Quality(perplexity=ppl, nll=0.0, kld=kld, top1_agreement=None if kld is None else 0.9,
                      tokens=1024, windows=2, window=512)
    size = SizeReport(params=1000, model_bytes=int(mb * 1e6), linear_weights=800, linear_bytes=int(800 * bpw / 8),
                      bits_per_weight=bpw, checkpoint_bytes=None)
    speed = None if tps is None else Speed(prefill_tokens_per_s=10 * tps, decode_tokens_per_s=tps,
                                           latency_p50_ms=1e3 / tps, latency_p95_ms=1.1e3 / tps,
                                           achieved_gb_per_s=1.0, bytes_per_token=1, peak_rss_mb=100.0,
                                           prompt_tokens=64, new_tokens=32, runs=3, threads=threads)
    env = {**environment(), "threads": threads}
    return Result(protocol=protocol, model=model, base="tiny", quality=quality, size=size, speed=speed, env=env)


def job_id(recipe: str) -> str:
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _samples(texts: list[str]) -> dict:
    return {"schema": "slimlm.samples/1", "samples": [{"prompt": p, "text": t} for p, t in zip(PROMPTS, texts)]}


def write_sweep(root: Path, jobs: list[dict], *, base: Result | None = None, samples: bool = True,
                base_texts: tuple[str, ...] = BASE_TEXTS) -> Path:
    """``jobs``: dicts with recipe, status ("done"/"failed"/"pending"), and result / error / texts."""
    base = base or make_result(ppl=10.0, kld=0.0, bpw=32.0, mb=4.0, tps=20.0)
    ids = [job_id(j["recipe"]) for j in jobs]
    _write(root / "sweep.json", {"schema": "slimlm.sweep/1", "model": "tiny", "protocol": base.protocol,
                                 "created": "2025-01-01T00:00:00+00:00",
                                 "jobs": [{"id": i, "recipe": j["recipe"]} for i, j in zip(ids, jobs)]})
    base.save(root / "base" / "result.json", overwrite=True)
    if samples:
        _write(root / "base" / "samples.json", _samples(list(base_texts)))
    for i, j in zip(ids, jobs):
        if j["status"] == "pending":
            continue
        d = root / "jobs" / i
        _write(d / "job.json", {"schema": "slimlm.job/1", "id": i, "model": "tiny", "recipe_name": j["recipe"],
                                "recipe": {"steps": []}, "protocol": base.protocol, "slimlm": "0.1.0",
                                "status": j["status"], "error": j.get("error"), "seconds": j.get("seconds", 1.5),
                                "wall_seconds": 3.0, "finished": "2025-01-01T00:01:00+00:00"})
        if j["status"] == "done":
            j["result"].save(d / "result.json", overwrite=True)
            if samples:
                _write(d / "samples.json", _samples(j.get("texts", list(BASE_TEXTS))))
    return root


def standard_jobs() -> list[dict]:
    """Five finished recipes (two on the KLD frontier besides the base, one dominated, one tie), one failed."""
    r = make_result
    return [
        {"recipe": "int8", "status": "done", "result": r(ppl=10.05, kld=0.002, bpw=8.5, mb=1.5, tps=35.0)},
        {"recipe": "int4-g64", "status": "done", "result": r(ppl=10.8, kld=0.05, bpw=4.5, mb=1.0, tps=50.0),
         "texts": [" began in the ninth century.", " a set with an operation.", " south to the hills."]},
        {"recipe": "int4-bad", "status": "done", "result": r(ppl=11.5, kld=0.09, bpw=4.5, mb=1.0, tps=45.0)},
        {"recipe": "int3", "status": "done", "result": r(ppl=14.0, kld=0.3, bpw=3.5, mb=0.8, tps=55.0)},
        {"recipe": "int8-copy", "status": "done", "result": r(ppl=10.05, kld=0.002, bpw=8.5, mb=1.5, tps=35.0)},
        {"recipe": "nf2", "status": "failed", "error": "nf2 is not a scheme; valid: nf4, int2..int8"},
    ]


def evaluated_sweep(root: Path, schemes: tuple[str, ...] = ("int8-channel", "int4-g16", "int3-channel", "int2-g16")) -> Path:
    """A sweep folder from measured Results: a tiny llama and RTN copies of it, on a small pydoc protocol
    (needs SLIMLM_CACHE pointed somewhere disposable: the base outputs are cached there)."""
    import copy

    from slimlm.api import apply
    from slimlm.eval import Protocol, evaluate
    from slimlm.models.tiny import tiny_model, tiny_tokenizer
    from slimlm.quant import RTN

    proto = Protocol(name="pydoc-test", text="pydoc-v1", window=64, eval_tokens=256, prompt_tokens=16,
                     new_tokens=5, speed_runs=2, kl_top_k=32)
    tok, base_model = tiny_tokenizer(), tiny_model("llama", seed=0)
    base = evaluate(base_model, tok, source="tiny", protocol=proto, model_id="tiny@0")
    jobs = []
    for scheme in schemes:
        model = apply(copy.deepcopy(base_model), RTN(scheme=scheme))
        result = evaluate(model, tok, source=f"tiny-rtn-{scheme}", protocol=proto, base_source="tiny",
                          base_id="tiny@0", load_base=lambda: base_model)
        jobs.append({"recipe": f"rtn-{scheme}", "status": "done", "result": result})
    jobs.append({"recipe": "rtn-int9", "status": "failed", "error": "int9: bits must be 2..8"})
    return write_sweep(root, jobs, base=base, samples=False)
