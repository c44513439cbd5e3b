"""Knowledge distillation: a student model learns a teacher's next-token distributions (top-k logprobs served
by dist-infer's own engine and cached on disk)."""

from dist_infer.distill.config import DistillConfig
from dist_infer.distill.trainer import Callback, distill

__all__ = ["Callback", "DistillConfig", "distill"]
