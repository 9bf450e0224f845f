"""The calibration activations entering one decoder block: one hidden-state tensor per batch, with
that batch's keyword arguments (attention mask, rotary tables: the same for every block).

They live on the CPU, in RAM by default, or as one safetensors file per batch in a folder when they
would not fit (read back batch by batch when iterated). Either way :meth:`Activations.save` writes
them verbatim, so a resumed run continues from exactly the bytes an uninterrupted one would use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from lopro.io.atomic import atomic_write, sha256_file


def _batch_file(j: int) -> str:
    return f"batch-{j:05d}.safetensors"


class Activations:
    def __init__(self, kwargs: list[dict], folder: str | Path | None = None):
        self.kwargs = kwargs
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._hidden: list[torch.Tensor] = []
        self._n = 0

    def append(self, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to("cpu").contiguous()
        if self.folder is None:
            self._hidden.append(hidden)
        else:
            _write_tensor(self.folder / _batch_file(self._n), hidden)
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def hidden(self, j: int) -> torch.Tensor:
        if self.folder is None:
            return self._hidden[j]
        from safetensors.torch import load_file

        return load_file(str(self.folder / _batch_file(j)))["hidden"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for j in range(self._n):
            yield self.hidden(j), self.kwargs[j]

    def head(self, n: int) -> list[tuple[torch.Tensor, dict]]:
        return [(self.hidden(j), self.kwargs[j]) for j in range(min(n, self._n))]

    def like(self, folder: str | Path | None = None) -> "Activations":
        """An empty store for the next block's inputs, with the same kwargs (in RAM unless `folder`)."""
        return Activations(self.kwargs, folder)

    def save(self, folder: Path) -> dict[str, str]:
        """The hidden states written verbatim under `folder` (already there when stored on disk);
        returns file name -> SHA-256, for the resume manifest."""
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for j in range(self._n):
            path = folder / _batch_file(j)
            if self.folder is None or self.folder.resolve() != folder.resolve():
                _write_tensor(path, self.hidden(j))
            out[path.name] = sha256_file(path)
        return out

    @classmethod
    def load(cls, folder: Path, kwargs: list[dict], files: dict[str, str], in_ram: bool) -> "Activations":
        """The store `save` wrote, each file checked against its SHA-256 (ValueError when one differs)."""
        for name, digest in files.items():
            path = folder / name
            if not path.exists() or sha256_file(path) != digest:
                raise ValueError(f"saved activations {path} are missing or damaged")
        acts = cls(kwargs, None if in_ram else folder)
        acts._n = len(files)
        if in_ram:
            acts._hidden = [Activations(kwargs, folder).hidden(j) for j in range(len(files))]
        return acts


def _write_tensor(path: Path, t: torch.Tensor) -> None:
    from safetensors.torch import save_file

    atomic_write(path, b"", writer=lambda tmp: save_file({"hidden": t}, str(tmp), metadata={"format": "pt"}))


def estimate_bytes(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype = torch.float32) -> int:
    """One copy of a block's calibration activations."""
    return nsamples * seqlen * hidden * dtype.itemsize


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where there is none."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
