"""When to trust an answer: temperature scaling, group-aware conformal prediction sets and the
per-image out-of-distribution checks that decide whether a radiologist should look instead."""
