"""The reference corpus's fixed splits, shipped inside the package.

The eval and validation splits of the reference corpus, and a calibration sample of its
train split, were cut once from the Python 3.11.7 standard library (the interpreter the
committed checkpoint was trained on) with the corpus's split rule, and are stored here as
fixed data, so every machine and every Python >= 3.10 evaluates and calibrates on the same
tokens and gets the same eval fingerprint. Training alone still reads the running
interpreter's standard library (`corpus.stdlib_tokens("train")`).

Format: `data/<name>.u16.xz` is the split's token stream (for each source file in path
order: BOS, its bytes, EOS) as little-endian uint16, xz-compressed; `data/manifest.json`
records for each file its token count, the sha256 of the decompressed stream and the
source files it holds. Rebuild (only on the Python the manifest names, to keep the data):

    python -m quantatlas.reference.data build     # writes data/*.u16.xz and manifest.json
    python -m quantatlas.reference.data check     # verifies the shipped files against the manifest

This module needs only the standard library (numpy is imported lazily), so the fixed
token streams and their eval fingerprint can be checked on a bare interpreter.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import sys
from array import array
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
MANIFEST = DATA_DIR / "manifest.json"
NAMES = ("eval", "validation", "calib")
CALIB_TOKENS = 2_000_000   # whole train files, drawn by a hash of their path, until this many tokens
BOS, EOS = 256, 257        # as in corpus.py (kept here so this module imports nothing of the package)


class FixedDataError(RuntimeError):
    """The package's shipped data is missing or corrupt: a broken installation, not a mistake in what
    the user gave, so not a UserError (and this module imports nothing of the package)."""


@lru_cache(maxsize=None)
def manifest() -> dict:
    try:
        return json.loads(MANIFEST.read_text())
    except FileNotFoundError:
        raise FixedDataError(f"{MANIFEST} is missing: the package was installed without its data "
                             "(rebuild with `python -m quantatlas.reference.data build`)") from None


def token_count(name: str) -> int:
    """Tokens in a shipped stream, from the manifest (nothing decompressed): what a spec reading
    `stdlib` on the byte-level reference model can ask for before any model is loaded."""
    if name not in NAMES:
        raise ValueError(f"unknown fixed split {name!r}; expected one of {NAMES}")
    return int(manifest()["files"][name]["tokens"])


@lru_cache(maxsize=None)
def stream_bytes(name: str) -> bytes:
    """The decompressed token stream of a fixed split (uint16 little-endian), checked against the manifest."""
    if name not in NAMES:
        raise ValueError(f"unknown fixed split {name!r}; expected one of {NAMES}")
    entry = manifest()["files"][name]
    path = DATA_DIR / entry["file"]
    try:
        raw = lzma.decompress(path.read_bytes())
    except FileNotFoundError:
        raise FixedDataError(f"{path} is missing: the package was installed without its data") from None
    if hashlib.sha256(raw).hexdigest() != entry["sha256"] or len(raw) != 2 * entry["tokens"]:
        raise FixedDataError(f"{path}: decompressed stream does not match the sha256 in {MANIFEST.name}")
    return raw


def token_array(name: str) -> array:
    """The stream as a pure-Python array of uint16 (no numpy)."""
    a = array("H")
    a.frombytes(stream_bytes(name))
    if sys.byteorder == "big":
        a.byteswap()
    return a


def tokens(name: str):
    """The stream as a read-only numpy int64 array."""
    return _np_tokens(name)


@lru_cache(maxsize=None)
def _np_tokens(name: str):
    import numpy as np

    out = np.frombuffer(stream_bytes(name), dtype="<u2").astype(np.int64)
    out.setflags(write=False)
    return out


def documents(name: str) -> list[bytes]:
    """The source files a fixed stream holds, as bytes (what lies between each BOS and its EOS)."""
    toks = token_array(name)
    docs, start = [], None
    for i, t in enumerate(toks):
        if t == BOS:
            start = i + 1
        elif t == EOS:
            docs.append(bytes(toks[start:i].tolist()))
    return docs


def fingerprint(name: str, n_tokens: int, ctx: int, score: str = "second_half") -> str:
    """The eval fingerprint of `make_eval_set(tokens(name), n_tokens, ctx, score)`, in pure Python.

    Mirrors eval/windows.py (whole windows of ctx tokens from the start of the stream) and
    corpus.eval_fingerprint (sha256 of a header and the tokens as little-endian int64)."""
    toks = token_array(name)
    used = (min(len(toks), n_tokens) // ctx) * ctx
    if used < ctx:
        raise ValueError(f"{len(toks)} tokens is shorter than one window of ctx={ctx}")
    wide = array("q", toks[:used])
    if sys.byteorder == "big":
        wide.byteswap()
    h = hashlib.sha256()
    h.update(f"ctx={ctx};score_all={score == 'all'};n={used};".encode())
    h.update(wide.tobytes())
    return h.hexdigest()[:16]


# ---- building the data (from the running interpreter's standard library) ----

def _calib_files(train_files, root: Path, budget: int) -> list:
    """Whole train files in the order of sha256('calib:' + relpath) until `budget` tokens; then path order."""
    def key(p):
        return hashlib.sha256(b"calib:" + p.relative_to(root).as_posix().encode()).digest()

    keyed = sorted(train_files, key=key)
    chosen, n = [], 0
    for p in keyed:
        if n >= budget:
            break
        chosen.append(p)
        n += p.stat().st_size + 2
    return sorted(chosen)


def build_streams(calib_tokens: int = CALIB_TOKENS) -> dict:
    """{name: (uint16 LE bytes, [relpaths])} cut from the running interpreter's standard library."""
    import numpy as np

    from quantatlas.reference import corpus

    root = corpus.stdlib_root()
    sources = {"eval": list(corpus.corpus_files("eval")), "validation": list(corpus.corpus_files("validation")),
               "calib": _calib_files(corpus.corpus_files("train"), root, calib_tokens)}
    out = {}
    for name, files in sources.items():
        toks = corpus.stream_of(files)
        if toks.max() >= 1 << 16:
            raise FixedDataError("token id does not fit uint16")
        out[name] = (np.ascontiguousarray(toks, dtype="<u2").tobytes(), [p.relative_to(root).as_posix() for p in files])
    return out


def build(out_dir: Path = DATA_DIR, calib_tokens: int = CALIB_TOKENS) -> dict:
    """Write the fixed splits and their manifest from this interpreter's standard library."""
    import platform

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (raw, rel) in build_streams(calib_tokens).items():
        fname = f"{name}.u16.xz"
        comp = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
        (out_dir / fname).write_bytes(comp)
        files[name] = {"file": fname, "tokens": len(raw) // 2, "sha256": hashlib.sha256(raw).hexdigest(),
                       "compressed_bytes": len(comp), "n_files": len(rel), "sources": rel}
    doc = {
        "about": "Fixed splits of the reference corpus: tokens (BOS=256, bytes, EOS=257 per source file, "
                 "files in path order) as little-endian uint16, xz-compressed; sha256 of the decompressed stream.",
        "built_from": f"Python {platform.python_version()} standard library",
        "split_rule": "corpus.split_of: sha256(relpath) bucket: 90 train / 5 validation / 5 eval; calib: whole "
                      f"train files by sha256('calib:' + relpath) until {calib_tokens} tokens",
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
    if Path(out_dir) == DATA_DIR:
        manifest.cache_clear()
        stream_bytes.cache_clear()
        _np_tokens.cache_clear()
    return doc


def check() -> dict:
    """Decompress every shipped file and verify it against the manifest; {name: tokens}."""
    return {name: len(stream_bytes(name)) // 2 for name in NAMES}


def _main(argv: list[str]) -> int:
    from quantatlas.tables import plain_table, render  # the command runs inside the package (rich)

    cmd = argv[0] if argv else "check"
    if cmd == "build":
        table = plain_table(("split", "left"), ("tokens", "right"), ("files", "right"), ("bytes", "right"),
                            ("sha256", "left"))
        for name, e in build()["files"].items():
            table.add_row(name, str(e["tokens"]), str(e["n_files"]), str(e["compressed_bytes"]), e["sha256"])
        print(render(table))
        return 0
    if cmd == "check":
        table = plain_table(("split", "left"), ("tokens", "right"), ("check", "left"))
        for name, n in check().items():
            table.add_row(name, str(n), "ok")
        print(render(table))
        return 0
    print("usage: python -m quantatlas.reference.data [build|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
