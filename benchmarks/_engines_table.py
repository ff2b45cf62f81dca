"""The table ``benchmarks/engines.py --table`` prints: one line per row, then the headline pairs."""

from __future__ import annotations

from typing import Any

# headline pairs: slimlm's calibrated 4-bit row -> llama.cpp's own quantization to the same GGUF type
HEADLINE = {"rtn-q8_0-shared": "llamacpp-q8_0", "gptq-q4_0": "llamacpp-q4_0", "gptq-q4_0-head8-shared": "llamacpp-q4_0", "gptq-q4_1": "llamacpp-q4_1", "awq-q4_1": "llamacpp-q4_1"}
# a relative weight error below this is F16 rounding: the base already lay on that quantizer's grid
ON_GRID = 1e-5


def _types(r: dict[str, Any]) -> str:
    return "+".join(r["linear_types"])


def _err(r: dict[str, Any]) -> str:
    return "-" if r.get("weight_error") is None else f"{r['weight_error']:.1e}"


def _speed(s: dict[str, Any] | None) -> str:
    """Decode tok/s; slimlm's eager / compiled step when both were timed."""
    if s is None:
        return "-"
    compiled, kv = s.get("decode_compiled_tok_s"), s.get("decode_kv_tok_s")
    return (f"{s['decode_tok_s']:.1f}" + (f" / {compiled:.1f} compiled" if compiled is not None else "")
            + (f" / {kv:.1f} {s['kv_loop']}" if kv is not None else ""))


def table(store: dict[str, Any]) -> str:
    s = store["settings"]
    head = ("row", "linears", "embd", "MB", "bits/w lin", "weight err", "ppl llama.cpp", "ppl slimlm", "ppl diff",
            "KLD llama.cpp", "KLD slimlm", "top-1 llama.cpp", "decode llama.cpp", "decode slimlm", "min")  # fmt: skip
    lines = [f"{s['model']}, {store['protocol']}, {store['tokens']:,} tokens in {store['windows']} windows, "
             f"{s['threads']} threads, decode {s['new_tokens']} tokens after a {store['prompt_tokens']}-token "
             "prompt (tok/s); slimlm runs recipe rows as its compressed modules, f16 as float32, llama.cpp "
             "rows dequantized (quality only)", " | ".join(head), " | ".join("---" for _ in head)]  # fmt: skip
    for row, r in store["rows"].items():
        lines.append(" | ".join([row, _types(r), r["embd"], f"{r['size_mb']:.1f}", f"{r['linear_bpw']:.2f}", _err(r),
                                 f"{r['llamacpp']['ppl']:.2f}", f"{r['slimlm']['ppl']:.2f}", f"{r['ppl_diff']:+.2%}",
                                 f"{r['llamacpp']['kld']:.4f}", f"{r['slimlm']['kld']:.4f}",
                                 f"{r['llamacpp']['top1']:.1%}", _speed(r["llamacpp_speed"]),
                                 _speed(r["slimlm_speed"]), f"{r['minutes']:.1f}"]))  # fmt: skip
    return "\n".join(lines + headline(store["rows"]))


def headline(rows: dict[str, Any]) -> list[str]:
    """slimlm's calibrated 4-bit export vs llama.cpp's own quantization to the same type, both scored in llama.cpp."""
    out = []
    for ours, theirs in HEADLINE.items():
        if ours in rows and theirs in rows:
            a, b = rows[ours], rows[theirs]
            ka, kb = a["llamacpp"]["kld"], b["llamacpp"]["kld"]
            verdict = "lower" if ka < kb else "NOT lower"
            out.append(f"{_types(b)}: slimlm {ours} KLD {ka:.4f} vs llama.cpp's own {kb:.4f} ({verdict}, "
                       f"{ka / kb - 1:+.0%}); ppl {a['llamacpp']['ppl']:.2f} vs {b['llamacpp']['ppl']:.2f}; "
                       f"{a['linear_bpw']:.2f} vs {b['linear_bpw']:.2f} bits/weight in the blocks, "
                       f"{a['size_mb']:.1f} vs {b['size_mb']:.1f} MB (embeddings {a['embd']} vs {b['embd']})")  # fmt: skip
            speed = _speed_ratio(a.get("slimlm_speed"), b.get("llamacpp_speed"))
            if speed:
                out.append(f"  decode: {speed}")
            if b.get("weight_error", 1.0) < ON_GRID:
                out.append(f"  (not a comparison of quantizers: llama.cpp's {theirs} moved the base's block weights "
                           f"by {b['weight_error']:.0e} only, so they already lay on its grid)")  # fmt: skip
    return out


def _speed_ratio(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """slimlm's decode (eager, compiled) over llama.cpp's on its own file, or '' when either is missing."""
    if not ours or not theirs:
        return ""
    ref = theirs["decode_tok_s"]
    parts = [f"slimlm {ours['decode_tok_s']:.1f} tok/s ({ours['decode_tok_s'] / ref:.2f}x)"]
    if ours.get("decode_compiled_tok_s") is not None:
        c = ours["decode_compiled_tok_s"]
        parts.append(f"compiled {c:.1f} ({c / ref:.2f}x)")
    if ours.get("decode_kv_tok_s") is not None:
        k = ours["decode_kv_tok_s"]
        parts.append(f"{ours['kv_loop']} {k:.1f} ({k / ref:.2f}x)")
    return (", ".join(parts) + f" vs llama.cpp {ref:.1f} (one load of each, minutes apart: one file's speed "
            "moved by up to 45% between processes here; benchmarks/engines_alternate.py gives the ratio)")
