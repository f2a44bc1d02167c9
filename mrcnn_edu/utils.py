"""Small helpers shared by every stage: printing tensors, fast mode, devices and paths.

Taught in: ``00_course_map.ipynb`` (environment check) and used by every notebook.

Shape shorthand used across the package:
    N  images in a batch          C  channels          H, W  height and width
    K  boxes / RoIs               A  anchors per location
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

FAST_ENV_VAR = "MRCNN_EDU_FAST"
CACHE_ENV_VAR = "MRCNN_EDU_CACHE"


class UserError(ValueError):
    """An error the user can fix (a bad path, argument or file): its message is one clear line.

    The CLI prints it as ``mrcnn-edu: error: <message>`` and exits with code 2, no traceback.
    """


def describe(x: Any, name: str | None = None) -> str:
    """Print and return a one-line summary of a tensor (or a dict/list of tensors).

    Like matterport's ``log()``: shape, dtype, min, max (and mean for floats), so that every
    step of a notebook can show what flows through the pipeline.

    >>> describe(torch.zeros(2, 3), "x")  # doctest: +SKIP
    x  shape=(2, 3)  float32  min=0  max=0  mean=0
    """
    rows = _describe_rows(x, name or "")
    width = max((len(label) for label, _ in rows), default=0)
    text = "\n".join(f"{label:<{width}s}  {rest}".rstrip() if label else rest for label, rest in rows)
    print(text)
    return text


def _describe_rows(x: Any, name: str) -> list[tuple[str, str]]:
    """(label, summary) pairs; nested dicts and lists of tensors give one row per tensor."""
    if isinstance(x, dict):
        out: list[tuple[str, str]] = []
        for key, value in x.items():
            out += _describe_rows(value, f"{name}[{key!r}]" if name else str(key))
        return out
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        out = []
        for i, value in enumerate(x):
            out += _describe_rows(value, f"{name}[{i}]")
        return out
    return [(name, _summary(x))]


def _summary(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        shape = tuple(x.shape)
        dtype = str(x.dtype).replace("torch.", "")
        if x.numel() == 0:
            return f"shape={shape}  {dtype}  (empty)"
        xd = x.detach()
        if xd.dtype == torch.bool:
            return f"shape={shape}  bool  true={int(xd.sum())}/{xd.numel()}"
        lo, hi = xd.min().item(), xd.max().item()
        text = f"shape={shape}  {dtype}  min={lo:.4g}  max={hi:.4g}"
        if xd.is_floating_point():
            text += f"  mean={xd.float().mean().item():.4g}"
        if xd.device.type != "cpu":
            text += f"  device={xd.device}"
        return text
    return f"{type(x).__name__}: {x!r}"


def fast_mode() -> bool:
    """True when ``MRCNN_EDU_FAST`` is set to a true value (the test suite sets it).

    Notebooks use it to shrink images, data sets and training runs so that each one
    executes in well under a minute.
    """
    return os.environ.get(FAST_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def pick_device(prefer: str | None = None) -> torch.device:
    """Return ``cuda`` when a GPU is present (or ``prefer`` names a device), else ``cpu``."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def repo_root() -> Path | None:
    """The checkout this package was installed from (editable install), or None."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "notebooks").is_dir() else None


def data_dir() -> Path:
    """Shipped samples and weights: ``<repo>/data`` in a checkout."""
    root = repo_root()
    return (root / "data") if root else Path.cwd() / "data"


def cache_dir() -> Path:
    """Where generated data goes: ``$MRCNN_EDU_CACHE``, else ``<repo>/data/cache`` (git-ignored)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    root = repo_root()
    return (root / "data" / "cache") if root else Path.home() / ".cache" / "mrcnn_edu"


def weights_dir() -> Path:
    """Shipped model weights (safetensors + JSON card)."""
    return data_dir() / "weights"


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores, torch version and threads, Python, platform and device: what a timing depends on."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def machine_line(info: Mapping | None = None, short: bool = False) -> str:
    """:func:`machine_info` (or a saved copy of it) in one line; ``short`` leaves out platform and device."""
    info = machine_info() if info is None else info
    line = (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads), "
            f"Python {info['python']}")
    return line if short else f"{line}, {info['platform']}, device {info['device']}"


def environment_report() -> dict[str, str]:
    """Versions, device, threads and paths, as shown by ``mrcnn-edu doctor`` and notebook 00."""
    import numpy
    import torchvision

    import mrcnn_edu

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = "cpu (no GPU found: everything in the course runs on the CPU)"
    weights = weights_dir()
    shipped = sorted(p.name for p in weights.glob("*.safetensors")) if weights.is_dir() else []
    return {
        "mrcnn_edu": mrcnn_edu.__version__,
        "python": platform.python_version() + f" ({sys.executable})",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "device": device,
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "fast mode": f"{fast_mode()} ({FAST_ENV_VAR}={os.environ.get(FAST_ENV_VAR, '')!r})",
        "data dir": str(data_dir()),
        "cache dir": str(cache_dir()),
        "weights dir": f"{weights} ({', '.join(shipped) if shipped else 'no shipped weights yet'})",
        "TORCH_HOME": os.environ.get("TORCH_HOME", "(unset; nothing is downloaded anyway)"),
    }


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``.

    A crash mid-write leaves the old file intact, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Loading state dicts (torchvision checkpoints into our modules) and input checks
# --------------------------------------------------------------------------------------------


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder ``new`` to ``out`` (atomic writes of whole folders).

    An existing ``out`` is set aside first and removed only after the rename; if the rename
    fails, it is put back, so ``out`` is always either the old or the new folder.
    """
    import shutil
    import uuid

    new, out = Path(new), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_state_dict_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict)``, but check everything first and explain mismatches."""
    expected = module.state_dict()
    state_dict = dict(state_dict)
    # `num_batches_tracked` counts BatchNorm2d updates; it is not a weight and FrozenBatchNorm2d
    # has none, so it may be absent on either side.
    for key in list(state_dict):
        if key.endswith("num_batches_tracked") and key not in expected:
            del state_dict[key]
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value

    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key}: {tuple(state_dict[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in [("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", wrong_shape)]:
            if keys:
                more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
                problems.append(f"{len(keys)} {label}, e.g. {keys[:5]}{more}")
        raise ValueError(
            f"state_dict from {source} does not match this {type(module).__name__} "
            f"(different architecture or norm layer?): " + "; ".join(problems)
        )
    module.load_state_dict(state_dict)


def load_mapped_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    key_map: Callable[[str], str],
    source: str,
) -> None:
    """Load a torchvision (sub)module's state dict into ours, renaming keys with ``key_map``.

    ``state_dict`` may be the submodule's own, or a whole model's whose keys for this submodule
    start with ``prefix`` (e.g. ``"rpn."``); the model's other keys are then ignored.
    """
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {key.removeprefix(prefix): value
                      for key, value in state_dict.items() if key.startswith(prefix)}
    ours = {key_map(key): value for key, value in state_dict.items()}
    load_state_dict_checked(module, ours, source)


def check_images(name: str, images) -> None:
    """Images must be a float Tensor[N, 3, H, W]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a float tensor of shape (N, 3, H, W), "
                         f"got a {type(images).__name__} (stack a list of images with torch.stack)")
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape (N, 3, H, W), "
                         f"got shape {tuple(images.shape)} and dtype {images.dtype}")
