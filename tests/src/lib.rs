//! End-to-end tests that start real nodes live in `tests/tests/`.
