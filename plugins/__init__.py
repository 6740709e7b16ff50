"""Built-in plugins of wbc-batch, installed as the import package `wbc_batch_plugins`.

Each module is one plugin, registered through the `wbc_batch` entry-point group (setup.cfg) and
listed in `wbc_batch.plugins.BUILTINS` under the same name.
"""
