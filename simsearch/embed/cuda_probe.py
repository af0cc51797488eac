"""Is there possibly a CUDA GPU here? Answered without importing torch (keeps ``info``/``cluster`` fast)."""

from __future__ import annotations

import glob
import os
import sys


def cuda_maybe_present() -> bool:
    """True when an NVIDIA driver or device node is visible (or torch, already loaded, sees CUDA);
    only then is it worth importing torch to ask properly."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return (
        os.path.exists("/proc/driver/nvidia/version")
        or os.path.exists("/dev/nvidiactl")
        or bool(glob.glob("/dev/nvidia[0-9]*"))
    )
