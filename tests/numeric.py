"""Numeric helpers shared by the algorithm tests (hand-computed expectations)."""
import math

import torch


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64),
                               atol=tol, rtol=0)


def softplus(x):
    """-logsigmoid(-x) = log(1 + e^x), written out for the expectations."""
    return math.log(1.0 + math.exp(x))
