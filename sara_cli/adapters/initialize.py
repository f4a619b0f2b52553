"""Adapter initialisation from the base's weights: each matrix read once, decomposed at most once.

Every method's initial factors come from the full-precision weight W (out, in):
    SARA           all singular values       -> k = k(W, tau)
    Mo-SARA        top-k singular vectors    (k from tau)
    PiSSA, SORSA   top-r singular triplets, and W itself for the frozen residual W - B0 A0
A `MatrixSource` hands these to one adapter layer. `CheckpointWeights` makes one per module from
the checkpoint's safetensors on disk, read one tensor at a time with the reader `sara analyze`
uses (`hub.iter_tensors`) and decomposed on the GPU when there is one, with every result kept in
the spectrum cache (cache.py). So a quantized base never has to be dequantized, the whole model
never has to be in memory first, and `analyze` then `train` decomposes each matrix once.

A layer built without a source decomposes its own loaded weight (the same functions, no cache):
on a float32 base both routes give bit-identical factors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sara_cli.model import cache as spectrum_cache
from sara_cli.model import hub
from sara_cli.errors import SaraError
from sara_cli.model.spectrum import TopK, rank_for_tau, singular_values, top_singular, top_singular_lowrank


def trim_host_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim; elsewhere nothing).

    glibc raises its mmap threshold to the size of each large block freed, so from the first
    W on, every W (and its float64 copy) lands on the heap, where the small tensors allocated
    after it pin it: without a trim the resident size grew by about one weight per module
    (measured: +10.8 MiB per 2752 x 1024 matrix), i.e. with the number of layers.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def principal_route(shape: tuple[int, int], rank: int, svd: str) -> str:
    """'lowrank' (randomized) when asked for and r is small next to the matrix, else 'full'."""
    return "lowrank" if svd == "lowrank" and rank * 4 < min(shape) else "full"


class MatrixSource:
    """The weight W (out, in) of one module and its decompositions, each made at most once.

    Args:
        name: the checkpoint tensor name (the cache key and the name in error messages).
        load: returns W (out, in) in full precision; called at most once, and only on a cache miss
            or for a residual.
        cache: a SpectrumCache, or None.
        device: where decompositions run; None: wherever `load` puts W.
        shape: W's (out, in) when known without reading it (from a file header).
    """

    def __init__(self, name: str, load: Callable[[], torch.Tensor], cache=None, device=None,
                 shape: tuple[int, int] | None = None):
        self.name = name
        self._load = load
        self._weight: torch.Tensor | None = None
        self.cache = cache
        self.device = device
        self._shape = shape

    def weight(self) -> torch.Tensor:
        """W (out, in) in its stored dtype, on the compute device."""
        if self._weight is None:
            W = self._load()
            self._weight = W if self.device is None else W.to(self.device)
        return self._weight

    def release(self) -> None:
        """Drop W (init of this module is done) and hand its memory back to the system."""
        if self._weight is not None:
            self._weight = None
            trim_host_memory()

    def _decompose(self, function, *args, **kwargs):
        try:
            return function(self.weight(), *args, **kwargs)
        except ValueError:
            raise SaraError(f"{self.name} contains NaN or inf values; the checkpoint is damaged") from None

    def values(self) -> torch.Tensor:
        """All singular values, descending, float64."""
        s = self.cache.values(self.name) if self.cache else None
        if s is None:
            s = self._decompose(singular_values, self.name)
            if self.cache:
                self.cache.put_values(self.name, s)
        return s

    def top(self, k: int | None = None, tau: float | None = None) -> TopK:
        """Top singular triplets (Gram eigensolve) for a given k, or for k = k(W, tau)."""
        if k is None:
            s = self.cache.values(self.name) if self.cache else None
            if s is None:  # one eigensolve gives the spectrum, k and the vectors
                top = self._decompose(top_singular, tau=tau, name=self.name)
                if self.cache:
                    self.cache.put_values(self.name, top.spectrum)
                    self.cache.put_top(self.name, "full", top)
                return top
            k = rank_for_tau(s, tau)
        return self._cached_top("full", k, lambda: self._decompose(top_singular, k=k, name=self.name))

    def principal(self, rank: int, svd: str) -> TopK:
        """Top-`rank` triplets for PiSSA/SORSA: randomized ('lowrank', niter 4) or 'full'."""
        rank = min(rank, min(self.shape))
        if principal_route(self.shape, rank, svd) == "lowrank":
            return self._cached_top("lowrank", rank, lambda: self._decompose(top_singular_lowrank, rank))
        return self._cached_top("full", rank, lambda: self._decompose(top_singular, k=rank, name=self.name))

    def _cached_top(self, route: str, k: int, compute) -> TopK:
        found = self.cache.top(self.name, route, k) if self.cache else None
        if found is None:
            found = compute()
            if self.cache:
                self.cache.put_top(self.name, route, found)
        return found

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), from the header when known, else from W."""
        return self._shape if self._shape is not None else tuple(self.weight().shape)


class CheckpointWeights:
    """The targeted weights of a checkpoint on disk, one `MatrixSource` per module.

    Args:
        model_dir: the checkpoint folder.
        device: where decompositions run; default the GPU when there is one, else the CPU.
        use_cache: keep and reuse spectra in the sara cache (also off with SARA_SPECTRUM_CACHE=0).
    """

    def __init__(self, model_dir: Path, device: str | None = None, use_cache: bool = True):
        self.model_dir = Path(model_dir)
        self.index = hub.tensor_index(self.model_dir)
        self.transposed = hub.is_conv1d_checkpoint(hub.load_config(self.model_dir))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.use_cache = use_cache and spectrum_cache.enabled()
        self._fingerprint: str | None = None
        self._cache = None
        self._digests: dict[str, str] = {}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = hub.fingerprint(self.model_dir)
        return self._fingerprint

    @property
    def cache(self):
        if self.use_cache and self._cache is None:
            self._cache = spectrum_cache.SpectrumCache(self.fingerprint, self.stamp)
        return self._cache

    def stamp(self, tensor: str) -> str:
        """sha256 of `tensor`'s stored bytes: a cache entry is used only for exactly these weights
        (see cache.py for why a content hash and not the file's size and time)."""
        if tensor not in self._digests:
            path, entry = self.index[tensor]
            self._digests[tensor] = hub.tensor_digest(path, entry)
        return self._digests[tensor]

    def tensor_name(self, module: str) -> str | None:
        """The checkpoint tensor holding `module`'s weight, or None when there is no unique one."""
        found = hub.match_tensor_names([module], list(self.index), strict=False)
        return next(iter(found), None)

    def read(self, tensor: str) -> torch.Tensor:
        """One weight from disk as (out, in), in its stored dtype (a view for Conv1D files)."""
        _, W = next(hub.iter_tensors(self.model_dir, [tensor], self.index))
        return W.T if self.transposed else W

    def source(self, module: str, shape: tuple[int, int] | None = None) -> MatrixSource | None:
        """A source for `module`'s weight, or None when the checkpoint has no matching tensor of
        that (out, in) shape (the caller then decides: fall back to the loaded weight, or fail)."""
        tensor = self.tensor_name(module)
        if tensor is None:
            return None
        stored = self.index[tensor][1]["shape"]
        out_in = tuple(reversed(stored)) if self.transposed else tuple(stored)
        if len(stored) != 2 or (shape is not None and out_in != tuple(shape)):
            return None
        return MatrixSource(tensor, lambda: self.read(tensor), self.cache, self.device, shape=out_in)


def layer_source(layer) -> MatrixSource:
    """A source over a layer's own loaded weight, without a cache (the pre-files route)."""
    return MatrixSource("matrix", layer.base_weight)
