"""YAML/CLI shorthand for schemes, parsed once here at the boundary.

Strings::

    int4-g64  int4-g128-sym  int8-channel  int8-channel-sym  int8-tensor  (+ "-clip")
    nf4  nf4-dq  nf4-b128  nf4-b128-dq
    kmeans4  kmeans3-tensor
    ternary  binary

Dicts (YAML): ``{"format": "int", "bits": 4, "group_size": 64, "symmetric": false}``
where ``group_size`` is an int, ``"channel"`` or ``"tensor"``; other formats
take their scheme's field names (``{"format": "nf4", "double_quant": true}``).
:func:`scheme_to_dict` writes the dict form back, for manifests.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.formats.granularity import PerChannel, PerGroup, PerTensor
from slimlm.formats.kmeans import KMeansInit
from slimlm.formats.scheme import (
    SCHEME_TYPES,
    BinaryScheme,
    IntScheme,
    KMeansScheme,
    NF4Scheme,
    Scheme,
    TernaryScheme,
)

STRING_FORMS = (
    "int<bits>-g<size>[-sym][-clip]",
    "int<bits>-channel[-sym][-clip]",
    "int<bits>-tensor[-sym][-clip]",
    "nf4[-b<block>][-dq]",
    "kmeans<bits>[-tensor]",
    "ternary",
    "binary",
)
FORMATS = {
    "int": IntScheme,
    "nf4": NF4Scheme,
    "kmeans": KMeansScheme,
    "ternary": TernaryScheme,
    "binary": BinaryScheme,
}

_INT = re.compile(r"int(\d+)-(?:g(\d+)|(channel)|(tensor))(-sym|-asym)?(-clip)?")
_NF4 = re.compile(r"nf4(?:-b(\d+))?(-dq)?")
_KMEANS = re.compile(r"kmeans(\d+)(-tensor)?")


def _refuse(obj: object) -> SlimlmError:
    forms = ", ".join(STRING_FORMS)
    return SlimlmError(
        f"unknown quantization scheme {obj!r}; valid strings: {forms}; "
        f"or a dict with format one of {', '.join(FORMATS)} (e.g. {{format: int, bits: 4, group_size: 64}})"
    )


def _parse_string(text: str) -> Scheme:
    s = text.strip().lower()
    if m := _INT.fullmatch(s):
        bits, size, channel, _tensor, sym, clip = m.groups()
        gran = PerGroup(int(size)) if size else PerChannel() if channel else PerTensor()
        return IntScheme(bits=int(bits), symmetric=sym == "-sym", granularity=gran, clip_search=bool(clip))
    if m := _NF4.fullmatch(s):
        block, dq = m.groups()
        return NF4Scheme(block_size=int(block) if block else 64, double_quant=bool(dq))
    if m := _KMEANS.fullmatch(s):
        return KMeansScheme(bits=int(m.group(1)), per_row=not m.group(2))
    if s == "ternary":
        return TernaryScheme()
    if s == "binary":
        return BinaryScheme()
    raise _refuse(text)


def _granularity(value: object) -> PerTensor | PerChannel | PerGroup:
    if value == "channel":
        return PerChannel()
    if value == "tensor":
        return PerTensor()
    if isinstance(value, int) and not isinstance(value, bool):
        return PerGroup(value)
    raise SlimlmError(f"group_size must be an int, 'channel' or 'tensor', got {value!r}")


def _parse_dict(obj: dict[str, Any]) -> Scheme:
    kwargs = dict(obj)
    cls = FORMATS.get(kwargs.pop("format", None))
    if cls is None:
        raise _refuse(obj)
    # In YAML an int scheme's granularity is written group_size: <int> | channel | tensor.
    allowed = ["group_size" if f.name == "granularity" else f.name for f in fields(cls)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        valid = ", ".join(["format", *allowed])
        raise SlimlmError(f"unknown key(s) {', '.join(unknown)} for format {obj['format']}; valid: {valid}")
    if "group_size" in kwargs:
        kwargs["granularity"] = _granularity(kwargs.pop("group_size"))
    if "init" in kwargs:
        valid = [m.value for m in KMeansInit]
        if kwargs["init"] not in valid:
            raise SlimlmError(f"kmeans init must be one of {', '.join(valid)}, got {kwargs['init']!r}")
        kwargs["init"] = KMeansInit(kwargs["init"])
    return cls(**kwargs)


def parse_scheme(obj: object) -> Scheme:
    """A scheme from a string shorthand, a YAML dict, or a scheme (returned as is)."""
    if isinstance(obj, SCHEME_TYPES):
        return obj
    if isinstance(obj, str):
        return _parse_string(obj)
    if isinstance(obj, dict):
        return _parse_dict(obj)
    raise _refuse(obj)


def _granularity_value(g: PerTensor | PerChannel | PerGroup) -> int | str:
    return g.size if isinstance(g, PerGroup) else "channel" if isinstance(g, PerChannel) else "tensor"


def scheme_to_dict(scheme: Scheme) -> dict[str, Any]:
    """The YAML dict form of ``scheme``; ``parse_scheme(scheme_to_dict(s)) == s``."""
    name = next((k for k, cls in FORMATS.items() if type(scheme) is cls), None)
    if name is None:
        raise _refuse(scheme)
    out: dict[str, Any] = {"format": name}
    for f in fields(scheme):
        value = getattr(scheme, f.name)
        if f.name == "granularity":
            out["group_size"] = _granularity_value(value)
        else:
            out[f.name] = value.value if isinstance(value, KMeansInit) else value
    return out
