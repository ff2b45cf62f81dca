"""Calibration and evaluation text, locked splits, tokenization.

    load_documents("wiki")            -> list[str]   (also "pydoc", a .txt/.jsonl path, "hf:...")
    split_documents(docs)             -> Split(calibration, evaluation)
    protocol_texts("wiki-v1")         -> Split       (the protocol's locked texts)
    tokenize_documents(tok, docs)     -> (n,) LongTensor
    token_windows(ids, window=512)    -> (n_windows, 512) LongTensor  (bos=bos_id(tok): BOS first in each)
    bos_id(tok)                       -> BOS id if the tokenizer starts inputs with it, else None
    calibration_batch(tok, docs)      -> (128, 512) LongTensor, seeded
    load_text("notes.txt")            -> Text        (documents + source + sha256)
    user_texts(calib_src, eval_src)   -> (Text | None, Text | None), split when one source serves both
"""

from slimlm.data.hf import HFSpec, load_hf_documents, parse_hf_spec
from slimlm.data.sources import (SOURCES, load_documents, pydoc_documents, read_jsonl_file,
                                 read_text_file, wiki_documents)
from slimlm.data.splits import PROTOCOL_TEXTS, ProtocolText, Split, protocol_texts, split_documents
from slimlm.data.texts import Text, load_text, text_sha256, user_texts
from slimlm.data.tokens import bos_id, calibration_batch, prompt_ids, token_windows, tokenize_documents
from slimlm.data.wiki import Article, wiki_articles, wiki_dump_path
from slimlm.data.wikimarkup import strip_wikitext

__all__ = [
    "Article", "HFSpec", "bos_id", "prompt_ids", "PROTOCOL_TEXTS", "ProtocolText", "SOURCES", "Split", "Text",
    "calibration_batch", "load_documents", "load_text", "load_hf_documents", "parse_hf_spec",
    "protocol_texts", "pydoc_documents", "read_jsonl_file", "read_text_file",
    "split_documents", "strip_wikitext", "text_sha256", "token_windows", "tokenize_documents", "user_texts",
    "wiki_articles", "wiki_documents", "wiki_dump_path",
]
