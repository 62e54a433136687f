"""What the suite may assume of the CPU it runs on: native bf16 or not (CI's machines vary)."""

from cov3d.runtime import cpu_bf16_features

NATIVE_BF16 = bool(cpu_bf16_features())
"""AVX-512 BF16 or AMX-BF16 that oneDNN may use; without them bf16 is emulated, dozens of times slower."""
BF16_SLICE = 32 if NATIVE_BF16 else 8
"""Slice size of the tests that train in bf16: 32x32 where bf16 is native; 8x8 where it is emulated,
which runs the same code (autocast, the bf16 convolution probes and repairs) in seconds a step."""
BF16_BATCH = 4 if NATIVE_BF16 else 2
"""Batch size of the tests that train the demo's network in bf16: half where bf16 is emulated, where
ATen's reference convolutions take about a second per layer4 backward at any slice size."""
