"""The spectrum cache: singular values and small top-k factors of a base's weights, on disk.

Keyed by the base's content fingerprint (`hub.fingerprint`) and the tensor name, so
`sara analyze` followed by `sara train`, or a second run with another tau, decomposes nothing
again. The fingerprint samples three rows per tensor, so each entry also records a stamp of its
own tensor, the sha256 of its stored bytes: a weight edited in place (in rows the fingerprint
does not read, even with the file's size and time restored) is decomposed again. Each entry also
carries a checksum of its own contents, checked on read: a damaged entry is a miss, logged, and
replaced. Layout, under the sara cache folder ($SARA_HOME, else ~/.cache/sara):

    spectra/v2/<fingerprint>/<tensor name>/values.safetensors       s (n,) float64, all of them
    spectra/v2/<fingerprint>/<tensor name>/<route>-k<k>.safetensors U (out, k), s (k,), Vh (k, in) float64

Values are always kept: min(out, in) float64 numbers per matrix. Top-k factors are kept only
while they are small next to the matrix (k (out + in) <= out * in / 4 elements), which covers
PiSSA/SORSA ranks and Mo-SARA at small tau; a large Mo-SARA k is decomposed again. Entries are
float64 exactly as computed, so a cached init is bit-identical to a fresh one. Every file is
written atomically; a cache that cannot be written (read-only home) is skipped with a log line.
Delete the folder to clear it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sara_cli.model.builtin import cache_dir
from sara_cli.model.spectrum import TopK

FORMAT = "v2"  # bump when the decomposition code, or what an entry records, changes
VECTOR_SHARE = 0.25  # keep top-k factors up to this share of the matrix's element count
log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def checksum(tensors: dict) -> str:
    """sha256 over an entry's tensors (names, dtypes, shapes and bytes), in name order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_root(root: Path | None = None) -> Path:
    """The folder holding every checkpoint's spectra."""
    return Path(root or cache_dir()) / "spectra"


class SpectrumCache:
    """Cached spectra of one base checkpoint (one fingerprint).

    Args:
        fingerprint: `hub.fingerprint` of the checkpoint.
        stamp: tensor name -> a string that changes when its file changes (size, mtime).
        root: the sara cache folder; default builtin.cache_dir().
    """

    def __init__(self, fingerprint: str, stamp=None, root: Path | None = None):
        self.folder = cache_root(root) / FORMAT / _safe(fingerprint.split(":")[-1])
        self.stamp = stamp or (lambda tensor: "")
        self.writable = True

    def _path(self, tensor: str, entry: str) -> Path:
        return self.folder / _safe(tensor) / f"{entry}.safetensors"

    def _read(self, tensor: str, entry: str) -> dict | None:
        from safetensors import SafetensorError, safe_open

        path = self._path(tensor, entry)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("stamp") != self.stamp(tensor):
                    return None  # the weights changed since
                found = {key: f.get_tensor(key) for key in f.keys()}
        except (OSError, SafetensorError):  # a damaged entry is recomputed, never trusted
            log.warning("ignoring unreadable cache entry %s; decomposing again", path)
            return None
        if metadata.get("checksum") != checksum(found):
            log.warning("cache entry %s fails its checksum (damaged on disk); decomposing again", path)
            return None
        return found

    def _write(self, tensor: str, entry: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        from sara_cli.errors import SaraError
        from sara_cli.files import atomic_path

        if not self.writable:
            return
        path = self._path(tensor, entry)
        try:
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"stamp": self.stamp(tensor), "checksum": checksum(tensors)})
        except (OSError, SaraError) as exc:
            self.writable = False
            log.warning("spectrum cache %s is not writable (%s); continuing without it", self.folder, exc)

    def values(self, tensor: str):
        """All singular values of `tensor` (descending, float64 CPU), or None."""
        found = self._read(tensor, "values")
        return None if found is None else found["s"]

    def put_values(self, tensor: str, s) -> None:
        self._write(tensor, "values", {"s": s})

    def top(self, tensor: str, route: str, k: int) -> TopK | None:
        """Top-k factors of `tensor` computed by `route` ("full" or "lowrank"), or None."""
        found = self._read(tensor, f"{route}-k{k}")
        if found is None:
            return None
        return TopK(U=found["U"], s=found["s"], Vh=found["Vh"], spectrum=found["spectrum"])

    def put_top(self, tensor: str, route: str, top: TopK) -> None:
        """Keep `top` if it is small next to the matrix (see VECTOR_SHARE)."""
        out_features, k = top.U.shape
        in_features = top.Vh.shape[1]
        if k * (out_features + in_features) > VECTOR_SHARE * out_features * in_features:
            return
        self._write(tensor, f"{route}-k{k}", {"U": top.U, "s": top.s, "Vh": top.Vh, "spectrum": top.spectrum})

    def size_bytes(self) -> int:
        """Bytes on disk for this checkpoint's entries."""
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*.safetensors"))


def enabled() -> bool:
    """False when SARA_SPECTRUM_CACHE=0 (every run decomposes afresh)."""
    return os.environ.get("SARA_SPECTRUM_CACHE", "1") not in ("0", "false", "no", "off")
