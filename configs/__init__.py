"""Config recipes, one file per family; `get_config(arg)` selects a variant.

Installed as `resnet_jax.configs`. Named on the command line as `--config=cifar:resnet56`
(the installed files, from any directory) or as a path, `--config=configs/cifar.py:resnet56`;
`resnet-jax configs` lists them.
"""
