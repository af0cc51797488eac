"""Is there possibly a CUDA GPU here? Answered without importing torch (keeps ``info``/``cluster`` fast)."""

from __future__ import annotations

import os


def cuda_maybe_present() -> bool:
    """True when an NVIDIA driver is visible; only then is it worth importing torch to ask properly."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")
