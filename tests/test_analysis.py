"""Shared study helpers: OOM retry halves the batch, seeded samples are stable and distinct."""

import pytest
import torch

from convviz.analysis import seeded_sample, with_oom_retry


def test_out_of_memory_halves_the_batch_until_it_fits():
    seen = []

    def work(batch_size):
        seen.append(batch_size)
        if batch_size > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch_size

    messages = []
    assert with_oom_retry(work, 64, log=messages.append, what="top9") == 16
    assert seen == [64, 32, 16]
    assert len(messages) == 2 and "retrying with 16" in messages[-1]


def test_out_of_memory_at_batch_one_names_the_sizes_tried():
    def work(batch_size):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match=r"occlusion: out of memory even with batch size 1 \(tried \[4, 2, 1\]\)"):
        with_oom_retry(work, 4, log=lambda m: None, what="occlusion")


def test_other_errors_are_not_retried():
    calls = []

    def work(batch_size):
        calls.append(batch_size)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        with_oom_retry(work, 8, log=lambda m: None)
    assert calls == [8]


def test_seeded_sample_is_stable_distinct_and_salted():
    a = seeded_sample(0, 100, 16, "conv1")
    assert a == seeded_sample(0, 100, 16, "conv1")
    assert len(set(a)) == 16 and a == sorted(a) and all(0 <= i < 100 for i in a)
    assert a != seeded_sample(0, 100, 16, "conv2") or a != seeded_sample(1, 100, 16, "conv1")
    assert seeded_sample(0, 5, 16) == [0, 1, 2, 3, 4]
    assert seeded_sample(0, 7, "all") == list(range(7))
