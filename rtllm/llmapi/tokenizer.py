"""Tokenizer loading for the LLM API: Hugging Face directories and GGUF files.

For a GGUF file, transformers rebuilds a fast tokenizer (vocab, merges, special tokens,
chat template) from the file's metadata. That takes ~6 s for SmolLM2's 49k-token
vocabulary, mostly spent by ``gguf.GGUFReader`` decoding the metadata arrays, while
loading the same tokenizer from a saved ``tokenizer.json`` takes ~0.15 s. So the first
build is saved with ``save_pretrained`` into a cache directory keyed by the GGUF file's
identity and reused afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RTLLM_CACHE_DIR"
_DEFAULT_CACHE_ROOT = os.path.join("~", ".cache", "rtllm")
# Files any one of which lets AutoTokenizer build a tokenizer without other inputs.
_SELF_CONTAINED_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.txt")
# Files that only work as a pair (slow/fast BPE tokenizers).
_BPE_PAIR = ("vocab.json", "merges.txt")
# Keys transformers needs to rebuild a tokenizer from GGUF metadata.
_GGUF_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")


def tokenizer_cache_root() -> str:
    """Return the directory that holds cached GGUF tokenizers.

    ``$RTLLM_CACHE_DIR/tokenizers`` if the variable is set (it names rtllm's cache root,
    shared with other caches), else ``~/.cache/rtllm/tokenizers``.
    """
    root = os.environ.get(CACHE_ENV_VAR) or _DEFAULT_CACHE_ROOT
    return os.path.join(os.path.expanduser(root), "tokenizers")


def _cache_key(gguf_path: str) -> str:
    # Path + size + mtime identify the file cheaply (hashing 100+ MB would cost more than
    # the build we are trying to skip). The transformers version is part of the key
    # because the saved format and the GGUF conversion both change across releases.
    st = os.stat(gguf_path)
    ident = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _check_gguf_has_tokenizer(gguf_path: str) -> None:
    # Imported lazily: the GGUF parser pulls in torch, which HF-only users may not need yet.
    from rtllm.models.gguf_loader import open_gguf

    metadata = open_gguf(gguf_path).metadata
    missing = [k for k in _GGUF_TOKENIZER_KEYS if k not in metadata]
    if missing:
        raise FileNotFoundError(
            f"GGUF file {gguf_path} has no embedded tokenizer (missing metadata keys: "
            f"{', '.join(missing)}). Pass tokenizer=<directory with tokenizer.json>."
        )


def _build_gguf_tokenizer(gguf_path: str) -> PreTrainedTokenizerBase:
    directory, filename = os.path.split(os.path.abspath(gguf_path))
    return AutoTokenizer.from_pretrained(directory, gguf_file=filename)


def _save_to_cache(tok: PreTrainedTokenizerBase, cache_dir: str) -> None:
    """Save ``tok`` into ``cache_dir`` atomically; failures are logged, not raised.

    The tokenizer is written into a temporary sibling directory and renamed into place,
    so a concurrent or interrupted writer never leaves a half-written cache entry that a
    reader would pick up.
    """
    tmp = None
    try:
        parent = os.path.dirname(cache_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, cache_dir)
            tmp = None
        except OSError:
            if not os.path.isdir(cache_dir):  # not a lost race with another writer
                raise
    except OSError as exc:
        logger.warning("Could not cache tokenizer in %s (%s); it will be rebuilt next time",
                       cache_dir, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf_tokenizer(gguf_path: str) -> PreTrainedTokenizerBase:
    _check_gguf_has_tokenizer(gguf_path)
    cache_dir = os.path.join(tokenizer_cache_root(), _cache_key(gguf_path))
    if os.path.isdir(cache_dir):
        try:
            tok = AutoTokenizer.from_pretrained(cache_dir)
            logger.debug("Loaded cached tokenizer for %s from %s", gguf_path, cache_dir)
            return tok
        except (OSError, ValueError) as exc:
            logger.warning("Ignoring unreadable tokenizer cache %s (%s)", cache_dir, exc)
            shutil.rmtree(cache_dir, ignore_errors=True)
    logger.info("Building tokenizer from GGUF metadata of %s (cached afterwards)", gguf_path)
    tok = _build_gguf_tokenizer(gguf_path)
    _save_to_cache(tok, cache_dir)
    return tok


def _check_tokenizer_dir(directory: str) -> None:
    present = set(os.listdir(directory))
    if present.intersection(_SELF_CONTAINED_FILES) or present.issuperset(_BPE_PAIR):
        return
    pair_found = present.intersection(_BPE_PAIR)
    if pair_found:
        missing = sorted(set(_BPE_PAIR) - pair_found)
        raise FileNotFoundError(
            f"Incomplete tokenizer in {directory}: found {', '.join(sorted(pair_found))} "
            f"but {', '.join(missing)} is missing"
        )
    raise FileNotFoundError(
        f"No tokenizer files in {directory}: expected one of "
        f"{', '.join(_SELF_CONTAINED_FILES)}, or both {' and '.join(_BPE_PAIR)}"
    )


def load_tokenizer(model_path: str, tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a model.

    Args:
        model_path: a Hugging Face model directory or a ``.gguf`` file.
        tokenizer: optional override of where the tokenizer comes from (directory,
            ``.gguf`` file, or a Hugging Face model id resolvable offline/online).

    Returns:
        A transformers tokenizer, including the chat template when the source has one.
        GGUF tokenizers are cached (see :func:`tokenizer_cache_root`).

    Raises:
        FileNotFoundError: the source does not exist or lacks tokenizer files; the
            message names what is missing.
        ValueError: the source is a file that is not ``.gguf``.
    """
    source = tokenizer if tokenizer is not None else model_path
    if os.path.isfile(source):
        if not source.lower().endswith(".gguf"):
            raise ValueError(
                f"Cannot load a tokenizer from file {source}: expected a .gguf file or a "
                "directory with tokenizer files"
            )
        return _load_gguf_tokenizer(source)
    if os.path.isdir(source):
        try:
            _check_tokenizer_dir(source)
        except FileNotFoundError:
            # A directory holding just one GGUF model carries its tokenizer inside it.
            ggufs = sorted(f for f in os.listdir(source) if f.lower().endswith(".gguf"))
            if len(ggufs) != 1:
                raise
            return _load_gguf_tokenizer(os.path.join(source, ggufs[0]))
        return AutoTokenizer.from_pretrained(source)
    if os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 \
            or source.lower().endswith(".gguf"):
        raise FileNotFoundError(f"Tokenizer source '{source}' does not exist")
    # Otherwise it may be a Hugging Face model id ("org/name"), e.g. in the local HF cache.
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"Tokenizer source '{source}' is not an existing file or directory, and loading "
            f"it as a Hugging Face model id failed: {exc}"
        ) from exc
