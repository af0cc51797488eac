"""Where and in what precision the model runs, and where JPEGs are decoded: the policy, checked up front.

Every choice a user makes with ``--device``, ``--precision`` and ``--decode`` is resolved here,
before any index is touched, so an impossible combination is an :class:`InputError` with a way
out, not a failure half-way through a run.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings

import torch
from PIL import Image

from ..errors import InputError

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "gpu")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), about twice as fast as
    fp32; elsewhere bf16 is emulated and slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    if capabilities is None:
        return False
    try:
        caps = capabilities()
    except Exception:  # an unknown CPU must not stop a run
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced dtype the model runs in, None for float32.

    ``auto``: bf16 on a GPU that supports it, else fp16; on a CPU, bf16 where the CPU has bf16
    units (:func:`cpu_has_native_bf16`), else fp32. The embeddings agree with fp32's to a cosine
    of about 0.9999, far closer than any two different images. ``fp32`` and ``bf16`` force a choice.
    """
    if precision not in PRECISION_CHOICES:
        raise InputError(f"unknown precision {precision!r}; use {', '.join(PRECISION_CHOICES)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise InputError("this GPU has no bf16; use --precision auto (fp16) or fp32")
        return autocast_dtype(device)
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# torchvision >= 0.29 warns on every decode_jpeg call that its image I/O is deprecated
_TORCHVISION_IO_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"
_filter_lock = threading.Lock()
_filter_installed = False


def ignore_torchvision_io_deprecation() -> None:
    """Silence torchvision's per-call deprecation warning of its JPEG decoder, once per process.

    One filter for that warning alone, added to the process-wide list the first time (under a
    lock) and never removed: unlike ``warnings.catch_warnings()``, which swaps the process-wide
    filters in and out and so races with every other thread, this is safe to call from any thread.
    """
    global _filter_installed
    with _filter_lock:
        if not _filter_installed:
            warnings.filterwarnings("ignore", message=_TORCHVISION_IO_DEPRECATION, category=DeprecationWarning)
            _filter_installed = True


def nvjpeg_unavailable_reason(device: torch.device) -> str | None:
    """None when ``decode_jpeg(device=cuda)`` works here; else why not (checked by decoding a tiny JPEG)."""
    if device.type != "cuda":
        return "GPU decoding needs a CUDA device"
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        ignore_torchvision_io_deprecation()
        out = decode_jpeg([data], mode=ImageReadMode.UNCHANGED, device=device)
        torch.cuda.synchronize(device)
        if tuple(out[0].shape) != (3, 16, 16):
            return f"torchvision's GPU decoder returned shape {tuple(out[0].shape)} for a 16x16 RGB JPEG"
    except Exception as exc:  # no nvJPEG in this torchvision build, driver trouble, ...
        return f"torchvision cannot decode JPEGs on {device}: {exc}"
    return None


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto`` = gpu when the model runs on CUDA and torchvision can decode JPEGs there, else cpu."""
    if decode not in DECODE_CHOICES:
        raise InputError(f"unknown decoder {decode!r}; use auto, cpu or gpu")
    if decode == "cpu":
        return "cpu"
    if device.type != "cuda":
        if decode == "gpu":
            raise InputError(
                "--decode gpu needs the model on a CUDA device, but it runs on the CPU here "
                "(no CUDA device available, or --device cpu); use --decode cpu or auto"
            )
        return "cpu"
    reason = nvjpeg_unavailable_reason(device)
    if reason is None:
        return "gpu"
    if decode == "gpu":
        raise InputError(f"--decode gpu: {reason}; use --decode cpu or auto")
    log.warning("decoding on the CPU: %s", reason)
    return "cpu"


def check_embed_options(device: str, decode: str, precision: str = "auto") -> None:
    """Fail fast (before any index is touched) on a device/decoder/precision combination that cannot work."""
    dev = resolve_device(device)
    resolve_precision(precision, dev)
    if decode not in DECODE_CHOICES:
        raise InputError(f"unknown decoder {decode!r}; use auto, cpu or gpu")
    if decode == "gpu" and dev.type != "cuda":
        resolve_decode(decode, dev)  # raises the explanatory InputError
