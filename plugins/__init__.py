"""Built-in plugins of wbc-batch, installed as the import package `wbc_batch_plugins`.

Each module is one plugin, declared in the `wbc_batch` entry-point group (setup.cfg) as a third
party's would be, and listed in `wbc_batch.plugins.BUILTINS` under the same name, from which it is
registered (with entry-point autoloading off too).
"""
