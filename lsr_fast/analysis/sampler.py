"""A streaming per-class sampler of feature vectors with bounded memory."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import _checks as check


class ClassReservoir:
    """Keeps a uniform random sample of at most ``capacity`` feature vectors per class across
    any number of batches, never more than C * capacity vectors (float32, on the CPU).

    Each offered vector gets a random key from a generator seeded with ``seed``; per class the
    ``capacity`` vectors with the smallest keys are kept (bottom-k sampling, which is a uniform
    sample without replacement of everything the class was offered). The same batches in the
    same order with the same seed give the same sample. Vectors labelled ``ignore_index`` are
    skipped; any other label outside [0, C) is an error.
    """

    def __init__(self, num_classes: int, capacity: int, *, seed: int = 0, ignore_index: int = 255):
        self.num_classes = check.positive_int("num_classes", num_classes)
        self.capacity = check.positive_int("capacity", capacity)
        self.ignore_index = check.integer("ignore_index", ignore_index)
        self._generator = torch.Generator().manual_seed(check.integer("seed", seed))
        self.vectors: Optional[torch.Tensor] = None  # (M, K) float32, grouped by class
        self.labels = torch.zeros(0, dtype=torch.int64)  # (M,)
        self._keys = torch.zeros(0, dtype=torch.float64)  # (M,)
        self.offered = torch.zeros(num_classes, dtype=torch.int64)  # vectors seen per class

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer (B, K, h, w) features with (B, h, w) labels, or (N, K) rows with (N,) labels."""
        check.features_and_labels(features, labels)
        check.label_values("labels", labels, self.num_classes, self.ignore_index)
        width = features.shape[1]
        if self.vectors is not None and self.vectors.shape[1] != width:
            raise ValueError(f"features have K={width} channels but earlier batches had {self.vectors.shape[1]}")
        rows = features.detach()
        if rows.dim() == 4:
            rows = rows.permute(0, 2, 3, 1).reshape(-1, width)
        flat = labels.reshape(-1).to("cpu", torch.int64)
        index = torch.nonzero(flat != self.ignore_index).reshape(-1)
        new_labels = flat[index]
        self.offered += torch.bincount(new_labels, minlength=self.num_classes)
        new_keys = torch.rand(index.numel(), generator=self._generator, dtype=torch.float64)

        # Candidates: what is kept so far, then the new vectors; choose on keys and labels only,
        # and gather just the chosen new rows (the batch's vectors are never all copied).
        keys = torch.cat([self._keys, new_keys])
        cand_labels = torch.cat([self.labels, new_labels])
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(cand_labels[order], stable=True)]  # by class, then by key
        sorted_labels = cand_labels[order]
        starts = torch.cumsum(torch.bincount(sorted_labels, minlength=self.num_classes), 0) - torch.bincount(
            sorted_labels, minlength=self.num_classes)
        rank = torch.arange(order.numel()) - starts[sorted_labels]
        chosen = order[rank < self.capacity]

        n_old = self._keys.numel()
        from_old = chosen < n_old
        new_rows = index[chosen[~from_old] - n_old].to(rows.device)
        parts_vectors = []
        if self.vectors is not None:
            parts_vectors.append(self.vectors)
        parts_vectors.append(rows[new_rows].float().cpu())
        pool = torch.cat(parts_vectors)
        # pool holds the old rows, then the chosen new rows in chosen order: map chosen to it
        position = torch.empty_like(chosen)
        position[from_old] = chosen[from_old]
        position[~from_old] = n_old + torch.arange(int((~from_old).sum()))
        self.vectors = pool[position]
        self.labels = cand_labels[chosen]
        self._keys = keys[chosen]

    def counts(self) -> torch.Tensor:
        """(C,) int64: vectors kept per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def class_vectors(self, c: int) -> torch.Tensor:
        """(n_c, K) float32 kept vectors of class ``c``, in key order (any prefix is itself a
        uniform sample)."""
        if self.vectors is None:
            return torch.zeros(0, 0)
        return self.vectors[self.labels == c]

    def subsample(self, total: int) -> tuple:
        """A balanced subset of about ``total`` kept vectors: the first total // n of each of the
        n present classes (all of a class's vectors when it has fewer). Returns (vectors, labels)."""
        check.positive_int("total", total)
        counts = self.counts()
        present = int((counts > 0).sum())
        if present == 0 or self.vectors is None:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        quota = max(1, total // present)
        # labels are grouped by class in key order, so the rank within the class is position - start
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(self.labels.numel()) - starts[self.labels]
        keep = rank < quota
        return self.vectors[keep], self.labels[keep]
