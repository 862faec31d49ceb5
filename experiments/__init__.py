"""The experiments: each module with a `main(argv)` is a program.

From the repository's root, `python -m experiments.degradation ...`; installed (as
`resnet_jax.experiments`), `resnet-jax degradation ...` from any directory. Modules import
each other relatively, so both work.
"""
