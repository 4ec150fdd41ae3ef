"""Test-wide settings: one CPU thread, so tiny tensors don't pay for thread hand-offs."""

import torch

torch.set_num_threads(1)
