"""Packing: several records per sequence of at most cutoff_len tokens, none attending to another.

Records are grouped into packs by best-fit decreasing (each record, longest first, goes into the
open pack whose free space it fills most closely). Inside a pack, transformers'
`DataCollatorWithFlattening` concatenates the records, restarts `position_ids` at 0 for each,
and sets each record's first label to -100, so no token predicts the next record's first one.
transformers turns restarting position_ids into a block-diagonal causal mask when a batch has
no attention_mask and no KV cache (`masking_utils.find_packed_sequence_indices`, eager and sdpa);
flash-attention kernels read them as varlen boundaries, but only for a batch of one row, so for
them the whole batch is flattened into one row. `check_isolation` runs the model once on packed
and separate records before training, and refuses packing where the two differ.
"""

from __future__ import annotations

from sara_cli.errors import SaraError

IGNORE = -100


class _FreeSpace:
    """Open packs by free space; finds the fullest pack with room for n tokens in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.counts = [0] * (2 * self.size)  # a segment tree of pack counts per free space
        self.packs: list[list[int]] = [[] for _ in range(capacity + 1)]

    def _change(self, space: int, delta: int) -> None:
        node = space + self.size
        while node:
            self.counts[node] += delta
            node //= 2

    def add(self, space: int, pack: int) -> None:
        self.packs[space].append(pack)
        self._change(space, 1)

    def take(self, need: int) -> tuple[int, int] | None:
        """(free space, pack) of an open pack with the least free space >= need, removed."""
        space = self._first(need, 1, 0, self.size)
        if space is None:
            return None
        self._change(space, -1)
        return space, self.packs[space].pop()

    def _first(self, low: int, node: int, left: int, right: int) -> int | None:
        if right <= low or self.counts[node] == 0:
            return None
        if right - left == 1:
            return left
        middle = (left + right) // 2
        found = self._first(low, 2 * node, left, middle)
        return found if found is not None else self._first(low, 2 * node + 1, middle, right)


def plan_packs(lengths, capacity: int) -> list[list[int]]:
    """Group record indices into packs of at most `capacity` tokens (best-fit decreasing).

    Deterministic: ties keep index order. Every record is in exactly one pack.

    Raises:
        ValueError: a record longer than capacity (tokenization truncates to cutoff_len first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    packs: list[list[int]] = []
    free = _FreeSpace(capacity)
    for i in order:
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"record {i} has {need} tokens, more than the pack size {capacity}")
        found = free.take(need)
        if found is None:
            space, pack = capacity, len(packs)
            packs.append([])
        else:
            space, pack = found
        packs[pack].append(i)
        if space - need > 0:
            free.add(space - need, pack)
    return packs


class PackedDataset:
    """A map-style dataset whose items are packs: lists of tokenized records."""

    def __init__(self, dataset, packs: list[list[int]]):
        self.dataset = dataset
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[i] for i in self.packs[index]]


class PackCollator:
    """Packs -> a batch with per-record position_ids and no attention_mask.

    rows (eager, sdpa, flex): one row per pack, (B, L) with L the longest pack; the short rows end
    in padding that forms its own position block and carries no labels. flatten (flash
    attention): every record of the batch in one row, (1, total), with cu_seq_lens.
    """

    def __init__(self, pad_token_id: int, flatten: bool = False):
        from transformers import DataCollatorWithFlattening

        self.pad_token_id = pad_token_id
        self.flatten = flatten
        self.one_row = DataCollatorWithFlattening(return_tensors="np")
        self.flash = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)

    def __call__(self, packs: list[list[dict]]) -> dict:
        import numpy as np
        import torch

        if self.flatten:
            return self.flash([record for pack in packs for record in pack])
        rows = [self.one_row(pack) for pack in packs]
        width = max(row["input_ids"].shape[1] for row in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)  # (B, L)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        position_ids = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        for r, row in enumerate(rows):
            n = row["input_ids"].shape[1]
            input_ids[r, :n], labels[r, :n] = row["input_ids"][0], row["labels"][0]
            position_ids[r, :n] = row["position_ids"][0]
            position_ids[r, n:] = np.arange(width - n)  # padding: a block of its own
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids)}


def collator_for(model, tokenizer) -> PackCollator:
    """The pack collator for this model's attention kernel."""
    kernel = str(getattr(model.config, "_attn_implementation", None) or "")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PackCollator(pad if pad is not None else 0, flatten=kernel.startswith("flash"))


PROBE_LENGTHS = (5, 7, 6, 4)  # two packs of two records: [5, 7] and [6, 4]


def check_isolation(model, collator: PackCollator) -> float:
    """Run the model on packed records and on each record alone; they must agree.

    Returns the largest logit difference. Run after `model.config.use_cache = False`, as training
    calls the model (a KV cache turns the packed-sequence mask off).

    Raises:
        SaraError: the packed logits differ, i.e. this model's attention lets records see each other.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    records = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in PROBE_LENGTHS]
    packs = [[{"input_ids": r, "labels": r} for r in records[:2]],
             [{"input_ids": r, "labels": r} for r in records[2:]]]
    batch = collator(packs)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**inputs).logits.float()  # (B, L, V)
            alone = [model(input_ids=torch.tensor([r], device=device)).logits.float()[0] for r in records]
    finally:
        model.train(training)
    worst, spread = 0.0, 0.0
    for k, logits in enumerate(alone):
        if collator.flatten:
            row, start = 0, sum(PROBE_LENGTHS[:k])
        else:
            row, start = k // 2, sum(PROBE_LENGTHS[2 * (k // 2):k])
        got = packed[row, start:start + len(records[k])]
        worst = max(worst, (got - logits).abs().max().item())
        spread = max(spread, (logits.max() - logits.min()).item())
    # float32 kernels agree to rounding; half precision to a few per cent of the logit range.
    tolerance = (1e-4 if model.dtype == torch.float32 else 5e-2) * max(spread, 1.0)
    if worst > tolerance:
        kernel = getattr(model.config, "_attn_implementation", "this")
        raise SaraError(f"data.packing: with the {kernel} attention kernel this model lets packed records "
                        f"attend to each other (a packed record's logits differ from the record alone by "
                        f"{worst:.3g}); set data.packing: false, or model.attn_implementation: sdpa")
    return worst
