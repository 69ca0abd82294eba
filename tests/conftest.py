"""Suite-wide settings. Area fixtures live in each tests/<area>/conftest.py."""
import os

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. This must
# be set before any kernel module is imported, which is why it lives at the top of the suite.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Local Ray clusters: a later `ray start` after an in-process ray.init would otherwise turn on
# token auth and break `ray job submit`.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
