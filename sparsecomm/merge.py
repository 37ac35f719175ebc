"""`sparsecomm merge`: model merging by composing sparse deltas against one base checkpoint.

    sparsecomm merge extract --base base/ --tuned add/ --out add.spd [--density 0.01] [--value bf16]
    sparsecomm merge info add.spd
    sparsecomm merge apply --base base/ --deltas add.spd sort.spd --method sum --out merged/
    sparsecomm merge apply --base base/ --deltas add.spd sort.spd --method task_arithmetic --weights 0.7 0.5 --out m/
    sparsecomm merge apply --base base/ --deltas add.spd sort.spd --method ties --density 0.5 --out m/  # mergekit

A delta file holds one fine-tuning run's change (tuned - base) in checkpoint coordinates (the
safetensors tensor names and shapes of a `save_pretrained` directory), encoded with the
project's codec (sparsecomm.codec SPCD message: sorted indices, values, CRCs), behind a JSON
manifest:

    offset 0  4 bytes  magic b"SPDM"
    offset 4  u32      manifest length M (little-endian)
    offset 8  M bytes  manifest JSON: {"format": 1, "base_fingerprint": sha256 hex, "dtype": the
                       base's tensor dtype, "value_codec", "density": k / numel over all tensors,
                       "k", "numel", "payload_bytes", "payload_sha256", "task", "source"}
    then      payload  the SPCD message (payload_bytes long)

`load_delta` refuses, each with one message naming the problem: a bad magic or manifest, a
truncated or padded payload, a payload whose hash or codec checks fail, a base whose fingerprint
(sha256 over tensor names, dtypes, shapes and bytes) differs, and a dtype that is not the base's.

Methods: `sum` (base + sum of deltas) and `task_arithmetic` (base + scale x sum w_i delta_i;
Ilharco et al., arXiv 2212.04089) are computed here, on the sparse entries. TIES (Yadav et al.,
arXiv 2306.01708) and DARE (Yu et al., arXiv 2311.03099: `dare_ties`, `dare_linear`) run through
mergekit (`pip install 'sparsecomm[merge]'`) on checkpoints materialised as base + delta with
`save_pretrained`'s layout: not re-implemented.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .codec import CodecError, decode_model, encode_model, roundtrip_values
from .compress import k_for, make_selector
from .delta import DTYPE_NAMES, DTYPES, SparseDelta

MAGIC = b"SPDM"
FORMAT = 1
_PREFIX = struct.Struct("<4sI")
WEIGHTS = "model.safetensors"
OURS = ("sum", "task_arithmetic")
MERGEKIT = ("ties", "dare_ties", "dare_linear")
METHODS = OURS + MERGEKIT


class DeltaFileError(ValueError):
    """A delta file that cannot be used: malformed, truncated, or for another base / dtype."""


# ------------------------------------------------------------------------------ checkpoints

def load_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a save_pretrained directory (or a .safetensors file), by checkpoint name."""
    from safetensors.torch import load_file

    p = Path(ckpt)
    f = p / WEIGHTS if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"{ckpt}: no {WEIGHTS} (expected a save_pretrained directory with safetensors weights)")
    return load_file(str(f))


def save_like(base_dir: str | Path, weights: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """A checkpoint directory: the base's config/tokenizer files with `weights` as its model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(base_dir).iterdir():
        if f.is_file() and f.name != WEIGHTS and not f.name.endswith(".bin"):
            shutil.copy2(f, out / f.name)
    save_file({n: t.contiguous() for n, t in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, raw bytes): two bases match only if every weight is identical."""
    h = hashlib.sha256()
    for n in sorted(weights):
        t = weights[n].contiguous()
        h.update(f"{n}|{DTYPE_NAMES.get(t.dtype, str(t.dtype))}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _base_dtype(weights: dict[str, torch.Tensor]) -> str:
    dtypes = {DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in weights.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise DeltaFileError(f"base has float tensors of several dtypes {sorted(dtypes)}; one dtype is required")
    return dtypes.pop()


# ------------------------------------------------------------------------------ delta files

def extract(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], density: float = 1.0,
            value: str = "fp32") -> dict[str, SparseDelta]:
    """tuned - base per tensor: every changed entry (density 1.0), or each tensor's top-k by |change|."""
    if set(base) != set(tuned):
        raise DeltaFileError(f"tuned and base checkpoints name different tensors: {sorted(set(base) ^ set(tuned))[:4]}")
    selector = make_selector("topk")
    out = {}
    for n in sorted(base):
        b, t = base[n], tuned[n]
        if b.shape != t.shape:
            raise DeltaFileError(f"tensor {n!r}: tuned shape {tuple(t.shape)} != base shape {tuple(b.shape)}")
        if not b.is_floating_point():
            continue
        diff = t.to(torch.float32) - b.to(torch.float32)
        changed = int(torch.count_nonzero(diff))
        k = min(changed, k_for(diff.numel(), density))
        d = selector.select(diff, k)
        # values as the file will decode them, in the base's dtype (what they are added to)
        out[n] = SparseDelta(d.indices, roundtrip_values(d, value).values.to(b.dtype), d.shape, b.dtype)
    return out


def save_delta(path: str | Path, deltas: dict[str, SparseDelta], base: dict[str, torch.Tensor], value: str = "fp32",
               task: str = "", source: str = "") -> dict:
    payload = encode_model(deltas, value=value)
    k, numel = sum(d.k for d in deltas.values()), sum(d.numel for d in deltas.values())
    manifest = {"format": FORMAT, "base_fingerprint": fingerprint(base), "dtype": _base_dtype(base), "value_codec": value,
                "density": k / numel if numel else 0.0, "k": k, "numel": numel, "payload_bytes": len(payload),
                "payload_sha256": hashlib.sha256(payload).hexdigest(), "task": task, "source": source}
    m = json.dumps(manifest, sort_keys=True).encode()
    Path(path).write_bytes(_PREFIX.pack(MAGIC, len(m)) + m + payload)
    return manifest


def read_manifest(path: str | Path) -> tuple[dict, memoryview]:
    buf = memoryview(Path(path).read_bytes())
    if len(buf) < _PREFIX.size:
        raise DeltaFileError(f"{path}: {len(buf)} bytes, too short for a delta file")
    magic, mlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise DeltaFileError(f"{path}: bad magic {bytes(magic)!r}, not a sparsecomm delta file")
    if len(buf) < _PREFIX.size + mlen:
        raise DeltaFileError(f"{path}: truncated inside the manifest")
    try:
        manifest = json.loads(bytes(buf[_PREFIX.size:_PREFIX.size + mlen]))
    except ValueError as e:
        raise DeltaFileError(f"{path}: manifest is not JSON ({e})") from None
    need = {"format", "base_fingerprint", "dtype", "value_codec", "density", "payload_bytes", "payload_sha256"}
    if not isinstance(manifest, dict) or not need <= set(manifest):
        raise DeltaFileError(f"{path}: manifest lacks {sorted(need - set(manifest or {}))}")
    if manifest["format"] != FORMAT:
        raise DeltaFileError(f"{path}: delta file format {manifest['format']!r}, this build reads {FORMAT}")
    payload = buf[_PREFIX.size + mlen:]
    if len(payload) != manifest["payload_bytes"]:
        raise DeltaFileError(f"{path}: payload is {len(payload)} bytes, the manifest says {manifest['payload_bytes']} "
                             f"({'truncated' if len(payload) < manifest['payload_bytes'] else 'padded'})")
    return manifest, payload


def load_delta(path: str | Path, base: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, SparseDelta], dict]:
    """Decode a delta file; with `base`, refuse one made against another base or dtype."""
    manifest, payload = read_manifest(path)
    if hashlib.sha256(payload).hexdigest() != manifest["payload_sha256"]:
        raise DeltaFileError(f"{path}: payload hash mismatch (corrupted)")
    if base is not None:
        if manifest["base_fingerprint"] != fingerprint(base):
            raise DeltaFileError(f"{path}: made against base {manifest['base_fingerprint'][:12]}..., but this base is "
                                 f"{fingerprint(base)[:12]}... (a different checkpoint)")
        if manifest["dtype"] != _base_dtype(base):
            raise DeltaFileError(f"{path}: delta dtype {manifest['dtype']} but the base is {_base_dtype(base)}")
    if manifest["dtype"] not in DTYPES:
        raise DeltaFileError(f"{path}: unknown dtype {manifest['dtype']!r}")
    try:
        deltas = decode_model(payload)
    except CodecError as e:
        raise DeltaFileError(f"{path}: {e}") from None
    for n, d in deltas.items():
        if DTYPE_NAMES[d.dtype] != manifest["dtype"]:
            raise DeltaFileError(f"{path}: tensor {n!r} is {DTYPE_NAMES[d.dtype]}, the manifest says {manifest['dtype']}")
        if base is not None and (n not in base or tuple(base[n].shape) != d.shape):
            raise DeltaFileError(f"{path}: tensor {n!r} {d.shape} is not in the base with that shape")
    return deltas, manifest


# ------------------------------------------------------------------------------ composition

def compose(base: dict[str, torch.Tensor], deltas: list[dict[str, SparseDelta]], weights: list[float] | None = None,
            scale: float = 1.0) -> dict[str, torch.Tensor]:
    """base + scale x sum_i w_i delta_i, accumulated in fp32 on the sparse entries (sum: all w_i = scale = 1)."""
    weights = weights or [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} deltas")
    out = {n: t.to(torch.float32).clone() for n, t in base.items()}
    for w, ds in zip(weights, deltas):
        for n, d in ds.items():
            d.add_to(out[n], alpha=scale * w)
    return {n: out[n].to(base[n].dtype) for n in out}


def support_stats(a: dict[str, SparseDelta], b: dict[str, SparseDelta]) -> dict:
    """Overlap of two deltas' supports, and sign conflicts (interference) where they overlap."""
    inter = union = conflict = 0
    for n in set(a) & set(b):
        ia, ib = a[n].indices, b[n].indices
        common, pa, pb = _intersect(ia, ib)
        inter += common
        union += ia.numel() + ib.numel() - common
        conflict += int((torch.sign(a[n].values[pa].float()) != torch.sign(b[n].values[pb].float())).sum()) if common else 0
    return {"overlap": inter, "union": union, "jaccard": inter / union if union else 0.0,
            "sign_conflict_fraction": conflict / inter if inter else 0.0}


def _intersect(ia: torch.Tensor, ib: torch.Tensor):
    import numpy as np

    _, pa, pb = np.intersect1d(ia.numpy(), ib.numpy(), assume_unique=True, return_indices=True)
    return len(pa), torch.from_numpy(pa), torch.from_numpy(pb)


def mergekit_merge(base_dir: str | Path, task_dirs: list[Path], method: str, out_dir: str | Path, density: float,
                   weights: list[float] | None = None, seed: int = 0) -> Path:
    """TIES / DARE through mergekit's Python API (the same as `mergekit-yaml`), on CPU, offline."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise ImportError(f"method {method!r} needs mergekit: pip install 'sparsecomm[merge]'") from None
    weights = weights or [1.0] * len(task_dirs)
    cfg = {"merge_method": method, "base_model": str(base_dir), "dtype": "float32",
           "models": [{"model": str(d), "parameters": {"density": density, "weight": w}} for d, w in zip(task_dirs, weights)],
           "parameters": {"normalize": True} if method != "dare_linear" else {}}
    run_merge(MergeConfiguration.model_validate(cfg), str(out_dir),
              MergeOptions(random_seed=seed, copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    return Path(out_dir)


def merge(base_dir: str | Path, delta_files: list[str | Path], method: str, out_dir: str | Path,
          weights: list[float] | None = None, scale: float = 1.0, density: float = 0.5, seed: int = 0) -> Path:
    """Apply `method` to the deltas against `base_dir`; write a save_pretrained-style directory to `out_dir`."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {METHODS}")
    base = load_weights(base_dir)
    deltas = [load_delta(f, base)[0] for f in delta_files]
    if method in OURS:
        if method == "sum" and (weights is not None or scale != 1.0):
            raise ValueError("method sum takes no weights or scale (use task_arithmetic)")
        return save_like(base_dir, compose(base, deltas, weights, scale), out_dir)
    with tempfile.TemporaryDirectory() as tmp:  # mergekit reads checkpoints: materialise base + delta_i
        dirs = [save_like(base_dir, compose(base, [d]), Path(tmp) / f"task{i}") for i, d in enumerate(deltas)]
        mergekit_merge(base_dir, dirs, method, out_dir, density, weights, seed)
    for f in Path(base_dir).iterdir():  # mergekit was told not to copy the tokenizer (it may not load a custom one)
        if f.is_file() and f.name != WEIGHTS and not (Path(out_dir) / f.name).exists():
            shutil.copy2(f, Path(out_dir) / f.name)
    return Path(out_dir)


# ------------------------------------------------------------------------------ CLI

def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="merge_command", required=True, metavar="ACTION")
    e = sub.add_parser("extract", help="write tuned - base as a sparse delta file")
    e.add_argument("--base", required=True, help="base checkpoint directory (save_pretrained, safetensors)")
    e.add_argument("--tuned", required=True, help="fine-tuned checkpoint directory from the same base")
    e.add_argument("--out", required=True, help="delta file to write (.spd)")
    e.add_argument("--density", type=float, default=1.0, help="keep each tensor's top-k by |change| (1.0: every changed entry)")
    e.add_argument("--value", default="fp32", help="value codec: fp32 | bf16 | fp16 | int8")
    e.add_argument("--task", default="", help="label stored in the manifest")
    i = sub.add_parser("info", help="print a delta file's manifest")
    i.add_argument("delta")
    a = sub.add_parser("apply", help="compose deltas onto the base and write a checkpoint")
    a.add_argument("--base", required=True)
    a.add_argument("--deltas", nargs="+", required=True)
    a.add_argument("--method", choices=METHODS, default="sum")
    a.add_argument("--weights", type=float, nargs="+", help="per-delta weights (task_arithmetic, ties, dare_*)")
    a.add_argument("--scale", type=float, default=1.0, help="task_arithmetic's lambda")
    a.add_argument("--density", type=float, default=0.5, help="TIES/DARE density (mergekit)")
    a.add_argument("--seed", type=int, default=0, help="DARE's random drop seed")
    a.add_argument("--out", required=True)


def run(args) -> int:
    try:
        if args.merge_command == "extract":
            base, tuned = load_weights(args.base), load_weights(args.tuned)
            m = save_delta(args.out, extract(base, tuned, args.density, args.value), base, args.value, args.task, str(args.tuned))
            print(f"{args.out}: k={m['k']} of {m['numel']} (density {m['density']:.4g}), {Path(args.out).stat().st_size} bytes")
        elif args.merge_command == "info":
            print(json.dumps(read_manifest(args.delta)[0], indent=2, sort_keys=True))
        else:
            out = merge(args.base, args.deltas, args.method, args.out, args.weights, args.scale, args.density, args.seed)
            print(f"wrote {out}")
    except (DeltaFileError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"sparsecomm merge: error: {e}")
        return 2
    return 0
